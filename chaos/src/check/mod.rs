//! What the suite checks a run's history against: the Wing-Gong-Lowe linearizability search and
//! the model of the task API it searches with.

pub mod task_model;
pub mod wgl;
