//! The attempts this executor has started, on disk (`DATA_DIR/started`, one `TASK TOKEN` line
//! each, fsynced before the attempt starts), so that no attempt ever starts twice here, even
//! across a crash: when an executor dies before its Started report commits, the cluster still
//! sees the attempt as assigned and sends it again to the restarted executor, which must refuse
//! it (the task is then retried under a new token) rather than run it a second time.

use colony_core::{FencingToken, TaskId};
use std::collections::{BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

const FILE_NAME: &str = "started";
/// Attempts remembered; older ones are long settled (the cluster stops re-sending an assignment
/// once the attempt is reported or superseded).
const REMEMBERED_MAX: usize = 4096;

pub(crate) struct Journal {
    path: PathBuf,
    file: File,
    /// Attempts started before this process began: a repeated assignment for one is refused.
    before_restart: BTreeSet<(TaskId, FencingToken)>,
    /// Lines in the file, for compaction.
    lines: VecDeque<(TaskId, FencingToken)>,
}

fn parse(line: &str) -> Option<(TaskId, FencingToken)> {
    let mut words = line.split_whitespace();
    let task = words.next()?.parse().ok()?;
    let token = words.next()?.parse().ok()?;
    words.next().is_none().then_some((TaskId(task), FencingToken(token)))
}

/// Writes the lines to a temporary file, fsyncs it and renames it over the journal.
fn rewrite(path: &Path, lines: &VecDeque<(TaskId, FencingToken)>) -> io::Result<()> {
    let temporary = path.with_extension("tmp");
    let mut file = File::create(&temporary)?;
    for (task, token) in lines {
        writeln!(file, "{} {}", task.0, token.0)?;
    }
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Journal {
    /// Reads what earlier runs started (a line torn by a crash mid-write is dropped: its attempt
    /// never started, since starting waits for the fsync) and keeps the newest entries.
    pub(crate) fn open(data_dir: &Path) -> io::Result<Journal> {
        let path = data_dir.join(FILE_NAME);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let mut lines: VecDeque<(TaskId, FencingToken)> = text.lines().filter_map(parse).collect();
        while lines.len() > REMEMBERED_MAX {
            lines.pop_front();
        }
        rewrite(&path, &lines)?;
        let file = OpenOptions::new().append(true).open(&path)?;
        Ok(Journal { path, file, before_restart: lines.iter().copied().collect(), lines })
    }

    /// Whether an earlier run of this executor started the attempt.
    pub(crate) fn started_before_restart(&self, attempt: (TaskId, FencingToken)) -> bool {
        self.before_restart.contains(&attempt)
    }

    /// Records that the attempt starts now; returns once that is on disk.
    pub(crate) fn record(&mut self, attempt: (TaskId, FencingToken)) -> io::Result<()> {
        writeln!(self.file, "{} {}", attempt.0 .0, attempt.1 .0)?;
        self.file.sync_data()?;
        self.lines.push_back(attempt);
        if self.lines.len() > 2 * REMEMBERED_MAX {
            while self.lines.len() > REMEMBERED_MAX {
                self.lines.pop_front();
            }
            rewrite(&self.path, &self.lines)?;
            self.file = OpenOptions::new().append(true).open(&self.path)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_started_by_an_earlier_run_are_known_after_a_restart() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut journal = Journal::open(dir.path())?;
        let first = (TaskId(7), FencingToken(41));
        assert!(!journal.started_before_restart(first));
        journal.record(first)?;
        // Only a restart makes an attempt "started before": this run knows its own attempts.
        assert!(!journal.started_before_restart(first));
        drop(journal);
        let reopened = Journal::open(dir.path())?;
        assert!(reopened.started_before_restart(first));
        assert!(!reopened.started_before_restart((TaskId(7), FencingToken(42))));
        Ok(())
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_the_journal_stays_bounded() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join(FILE_NAME), "1 10\n2 20\n3 3")?;
        let journal = Journal::open(dir.path())?;
        assert!(journal.started_before_restart((TaskId(2), FencingToken(20))));
        // "3 3" without its newline still parses as two numbers: it was fsynced whole or not at
        // all, and a complete pair means the write reached the disk before the attempt started.
        assert!(journal.started_before_restart((TaskId(3), FencingToken(3))));
        std::fs::write(dir.path().join(FILE_NAME), "1 10\n2 2x\ngarbage\n")?;
        let journal = Journal::open(dir.path())?;
        assert!(journal.started_before_restart((TaskId(1), FencingToken(10))));
        assert_eq!(journal.lines.len(), 1);

        let fresh = tempfile::tempdir()?;
        let mut journal = Journal::open(fresh.path())?;
        for token in 0..(2 * REMEMBERED_MAX as u64 + 1) {
            journal.record((TaskId(1), FencingToken(token)))?;
        }
        assert!(journal.lines.len() <= REMEMBERED_MAX + 1);
        Ok(())
    }
}
