//! Linearizability checking by the Wing–Gong–Lowe search, as Knossos and Porcupine implement it.
//!
//! A history is linearizable when every operation can be given one instant between its call and
//! its return such that running the operations in that order through a sequential [`Model`]
//! yields every output that was observed. The search walks the call and return events in time
//! order, places (linearizes) any operation whose call it has reached, and backtracks when it
//! reaches the return of an operation it has not placed. Every configuration it reaches (the set
//! of placed operations and the model states) is cached, so none is explored twice.

use std::collections::HashSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How many search steps pass between two looks at the clock.
const BUDGET_CHECK_INTERVAL: u64 = 1024;

/// Index of the list's head sentinel in [`EventList::nodes`].
const HEAD: usize = 0;
/// Index of the list's tail sentinel in [`EventList::nodes`].
const TAIL: usize = 1;

/// A sequential specification of the object under test.
///
/// The model may be nondeterministic: [`Model::init`] and [`Model::step`] return every state the
/// object may be in, and the checker follows all of them at once (the power-set construction).
pub trait Model {
    /// One state of the object.
    type State: Clone + Eq + Hash + Ord + Debug;
    /// What a client asked for.
    type Input: Debug;
    /// What the client was told.
    type Output: Debug;
    /// Every state the object may start in.
    fn init(&self) -> Vec<Self::State>;
    /// Every state the model may be in after `input` returned `output` in `state`; empty when
    /// that output is impossible there.
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: &Self::Output,
    ) -> Vec<Self::State>;
}

/// One client operation as the history recorded it.
#[derive(Debug, Clone)]
pub struct Operation<I, O> {
    /// The caller's index for this operation; witnesses name operations by it.
    pub id: usize,
    /// The client that issued the operation.
    pub client: u64,
    /// Invocation time in nanoseconds on a monotonic clock shared by the whole history.
    pub call: u64,
    /// Completion time; `None` when the outcome is unknown, so the operation may take effect at
    /// any point after `call`, or never. A time before `call` is read as `call`.
    pub ret: Option<u64>,
    /// What the client asked for.
    pub input: I,
    /// What the client was told.
    pub output: O,
}

/// The outcome of [`check`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Verdict {
    /// Some order of the operations, each within its call and return, satisfies the model.
    Linearizable,
    /// No such order exists; the witness shows where the search got furthest.
    NotLinearizable(Witness),
    /// The budget ran out first; `explored` counts the configurations visited.
    Unknown {
        /// Distinct (placed operations, model states) configurations visited.
        explored: u64,
    },
}

/// Why a history is not linearizable: the deepest point the search reached.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Witness {
    /// Ids of the longest linearizable prefix found, in linearization order.
    pub linearized: Vec<usize>,
    /// Ids of the operations that could have come next after that prefix; the model accepts
    /// none of them.
    pub unplaceable: Vec<usize>,
    /// The model states after the prefix, as `Debug` strings.
    pub states: Vec<String>,
}

/// Decides whether `ops` is linearizable with respect to `model`, giving up with
/// [`Verdict::Unknown`] once `budget` has passed.
pub fn check<M: Model>(
    model: &M,
    ops: &[Operation<M::Input, M::Output>],
    budget: Duration,
) -> Verdict {
    let started = Instant::now();
    let mut search = Search {
        model,
        ops,
        events: EventList::new(ops),
        states: normalize(model.init()),
        linearized: Bitset::new(ops.len()),
        cache: HashSet::new(),
        stack: Vec::new(),
    };
    let mut deepest: Option<Witness> = None;
    let mut entry = search.events.nodes[HEAD].next;
    let mut steps: u64 = 0;
    while search.events.nodes[HEAD].next != TAIL {
        steps += 1;
        if steps.is_multiple_of(BUDGET_CHECK_INTERVAL) && started.elapsed() > budget {
            return Verdict::Unknown { explored: search.cache.len() as u64 };
        }
        let Node { ret, next, .. } = search.events.nodes[entry];
        match ret {
            Some(ret) => {
                entry =
                    if search.place(entry, ret) { search.events.nodes[HEAD].next } else { next };
            }
            None => {
                // An operation returned before it could be placed: the prefix on the stack is a
                // dead end.
                if deepest.as_ref().is_none_or(|w| search.stack.len() > w.linearized.len()) {
                    deepest = Some(search.witness());
                }
                match search.backtrack() {
                    Some(call) => entry = search.events.nodes[call].next,
                    None => {
                        return Verdict::NotLinearizable(
                            deepest.unwrap_or_else(|| search.witness()),
                        )
                    }
                }
            }
        }
    }
    Verdict::Linearizable
}

/// The search's mutable state.
struct Search<'a, M: Model> {
    model: &'a M,
    ops: &'a [Operation<M::Input, M::Output>],
    events: EventList,
    /// The model states after the placed operations: sorted, without duplicates.
    states: Vec<M::State>,
    /// Which operations (by position in `ops`) are placed.
    linearized: Bitset,
    /// Every configuration reached so far.
    cache: HashSet<(Bitset, Vec<M::State>)>,
    /// The placed operations' call nodes in placement order, each with the states before it.
    stack: Vec<(usize, Vec<M::State>)>,
}

impl<M: Model> Search<'_, M> {
    /// Tries to place the operation whose call node is `call`; true when it leads somewhere new.
    fn place(&mut self, call: usize, ret: usize) -> bool {
        let op_index = self.events.nodes[call].op;
        let op = &self.ops[op_index];
        let next: Vec<M::State> = normalize(
            self.states.iter().flat_map(|s| self.model.step(s, &op.input, &op.output)).collect(),
        );
        if next.is_empty() {
            return false;
        }
        let mut linearized = self.linearized.clone();
        linearized.insert(op_index);
        if !self.cache.insert((linearized.clone(), next.clone())) {
            return false;
        }
        self.linearized = linearized;
        self.stack.push((call, std::mem::replace(&mut self.states, next)));
        self.events.lift(call, ret);
        true
    }

    /// Takes back the last placed operation and returns its call node; `None` when nothing is
    /// placed.
    fn backtrack(&mut self) -> Option<usize> {
        let (call, states) = self.stack.pop()?;
        let node = &self.events.nodes[call];
        self.linearized.remove(node.op);
        self.states = states;
        if let Some(ret) = node.ret {
            self.events.unlift(call, ret);
        }
        Some(call)
    }

    /// Describes the current dead end.
    fn witness(&self) -> Witness {
        let nodes = &self.events.nodes;
        let mut unplaceable = Vec::new();
        let mut entry = nodes[HEAD].next;
        while nodes[entry].ret.is_some() {
            unplaceable.push(self.ops[nodes[entry].op].id);
            entry = nodes[entry].next;
        }
        Witness {
            linearized: self.stack.iter().map(|&(call, _)| self.ops[nodes[call].op].id).collect(),
            unplaceable,
            states: self.states.iter().map(|s| format!("{s:?}")).collect(),
        }
    }
}

/// One call or return event in the doubly linked event list.
#[derive(Clone)]
struct Node {
    /// Position in the history of the operation the event belongs to.
    op: usize,
    /// For a call, the node of its return; `None` for returns and the sentinels.
    ret: Option<usize>,
    prev: usize,
    next: usize,
}

/// The events not yet placed, in time order, between a head and a tail sentinel. Placing an
/// operation lifts its two nodes out; backtracking puts them back (dancing links), so neither
/// allocates.
struct EventList {
    nodes: Vec<Node>,
}

impl EventList {
    /// Lists the calls and returns of `ops` in time order, calls before returns on equal times
    /// so that operations that touch are concurrent. Unknown returns come after everything.
    fn new<I, O>(ops: &[Operation<I, O>]) -> Self {
        // (time, is_return, op): sorting puts a call before a return at the same time.
        let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * ops.len());
        for (i, op) in ops.iter().enumerate() {
            events.push((op.call, false, i));
            events.push((op.ret.map_or(u64::MAX, |ret| ret.max(op.call)), true, i));
        }
        events.sort_unstable();

        let first = TAIL + 1;
        let mut return_node = vec![0; ops.len()];
        for (k, &(_, is_return, op)) in events.iter().enumerate() {
            if is_return {
                return_node[op] = first + k;
            }
        }
        let mut nodes = vec![Node { op: 0, ret: None, prev: HEAD, next: TAIL }; 2];
        nodes.extend(events.iter().map(|&(_, is_return, op)| Node {
            op,
            ret: (!is_return).then_some(return_node[op]),
            prev: HEAD,
            next: TAIL,
        }));
        let order: Vec<usize> =
            std::iter::once(HEAD).chain(first..nodes.len()).chain(std::iter::once(TAIL)).collect();
        for pair in order.windows(2) {
            nodes[pair[0]].next = pair[1];
            nodes[pair[1]].prev = pair[0];
        }
        Self { nodes }
    }

    /// Unlinks a placed operation's call and return nodes.
    fn lift(&mut self, call: usize, ret: usize) {
        self.unlink(call);
        self.unlink(ret);
    }

    /// Relinks what [`EventList::lift`] unlinked, in the reverse order.
    fn unlift(&mut self, call: usize, ret: usize) {
        self.relink(ret);
        self.relink(call);
    }

    fn unlink(&mut self, node: usize) {
        let Node { prev, next, .. } = self.nodes[node];
        self.nodes[prev].next = next;
        self.nodes[next].prev = prev;
    }

    fn relink(&mut self, node: usize) {
        let Node { prev, next, .. } = self.nodes[node];
        self.nodes[prev].next = node;
        self.nodes[next].prev = node;
    }
}

/// A set of operation positions.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Bitset(Vec<u64>);

impl Bitset {
    fn new(len: usize) -> Self {
        Self(vec![0; len.div_ceil(64)])
    }

    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn remove(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

/// Sorts and deduplicates a set of states so that equal sets compare and hash equal.
fn normalize<S: Ord>(mut states: Vec<S>) -> Vec<S> {
    states.sort_unstable();
    states.dedup();
    states
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    enum RegIn {
        Write(u64),
        Read,
    }

    #[derive(Debug)]
    enum RegOut {
        Ok,
        Value(u64),
        Unknown,
    }

    /// A read/write register that starts at 0.
    struct Register;

    impl Model for Register {
        type State = u64;
        type Input = RegIn;
        type Output = RegOut;

        fn init(&self) -> Vec<u64> {
            vec![0]
        }

        fn step(&self, state: &u64, input: &RegIn, output: &RegOut) -> Vec<u64> {
            match (input, output) {
                (RegIn::Write(v), RegOut::Ok) => vec![*v],
                (RegIn::Write(v), RegOut::Unknown) => vec![*state, *v],
                (RegIn::Read, RegOut::Value(v)) if v == state => vec![*state],
                (RegIn::Read, RegOut::Unknown) => vec![*state],
                _ => vec![],
            }
        }
    }

    fn op(
        id: usize,
        call: u64,
        ret: Option<u64>,
        input: RegIn,
        output: RegOut,
    ) -> Operation<RegIn, RegOut> {
        Operation { id, client: id as u64, call, ret, input, output }
    }

    fn write(id: usize, call: u64, ret: u64, v: u64) -> Operation<RegIn, RegOut> {
        op(id, call, Some(ret), RegIn::Write(v), RegOut::Ok)
    }

    fn read(id: usize, call: u64, ret: u64, v: u64) -> Operation<RegIn, RegOut> {
        op(id, call, Some(ret), RegIn::Read, RegOut::Value(v))
    }

    fn check_register(ops: &[Operation<RegIn, RegOut>]) -> Verdict {
        check(&Register, ops, Duration::from_secs(10))
    }

    #[test]
    fn empty_history_is_linearizable() {
        assert_eq!(check_register(&[]), Verdict::Linearizable);
    }

    #[test]
    fn concurrent_history_is_linearizable() {
        // The first write overlaps everything up to t=100, so it must take effect before the
        // read at 10..20, and the second write before the read at 50..60.
        let ops = [
            write(0, 0, 100, 1),
            read(1, 10, 20, 1),
            write(2, 30, 80, 2),
            read(3, 50, 60, 2),
            read(4, 40, 90, 1),
            read(5, 110, 120, 2),
        ];
        assert_eq!(check_register(&ops), Verdict::Linearizable);
    }

    #[test]
    fn stale_read_after_completed_write_is_not_linearizable() {
        let ops = [write(0, 0, 10, 1), read(1, 20, 30, 0)];
        let Verdict::NotLinearizable(witness) = check_register(&ops) else {
            panic!("a read after a completed write saw the old value");
        };
        assert_eq!(witness.linearized, vec![0]);
        assert_eq!(witness.unplaceable, vec![1]);
        assert_eq!(witness.states, vec!["1".to_string()]);
    }

    #[test]
    fn touching_operations_are_concurrent() {
        // The read is called at the instant the write returns, so it may come first.
        let ops = [write(0, 0, 10, 1), read(1, 10, 20, 0)];
        assert_eq!(check_register(&ops), Verdict::Linearizable);
    }

    #[test]
    fn unknown_write_seen_by_later_reads_is_linearizable() {
        let ops = [
            op(0, 0, None, RegIn::Write(1), RegOut::Unknown),
            read(1, 50, 60, 0),
            read(2, 70, 80, 1),
            read(3, 90, 100, 1),
        ];
        assert_eq!(check_register(&ops), Verdict::Linearizable);
    }

    #[test]
    fn unknown_write_no_read_sees_is_linearizable() {
        let ops = [
            op(0, 0, None, RegIn::Write(1), RegOut::Unknown),
            read(1, 50, 60, 0),
            read(2, 70, 80, 0),
        ];
        assert_eq!(check_register(&ops), Verdict::Linearizable);
    }

    #[test]
    fn unknown_write_cannot_be_unseen() {
        let ops = [
            op(0, 0, None, RegIn::Write(1), RegOut::Unknown),
            read(1, 50, 60, 1),
            read(2, 70, 80, 0),
        ];
        assert!(matches!(check_register(&ops), Verdict::NotLinearizable(_)));
    }

    /// Whether some order of `ops` that respects real time satisfies `Register`, by trying
    /// every such order.
    fn brute_force(
        ops: &[Operation<RegIn, RegOut>],
        placed: &mut Vec<bool>,
        states: &[u64],
    ) -> bool {
        if placed.iter().all(|&p| p) {
            return true;
        }
        let returned_before = |i: usize, j: usize| ops[j].ret.is_some_and(|ret| ret < ops[i].call);
        for i in 0..ops.len() {
            if placed[i] || (0..ops.len()).any(|j| !placed[j] && returned_before(i, j)) {
                continue;
            }
            let next = normalize(
                states
                    .iter()
                    .flat_map(|s| Register.step(s, &ops[i].input, &ops[i].output))
                    .collect(),
            );
            if next.is_empty() {
                continue;
            }
            placed[i] = true;
            let found = brute_force(ops, placed, &next);
            placed[i] = false;
            if found {
                return true;
            }
        }
        false
    }

    #[test]
    fn agrees_with_brute_force_on_small_random_histories() {
        // xorshift64*, so the histories are the same on every run.
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut random = |below: u64| {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            seed.wrapping_mul(0x2545_F491_4F6C_DD1D) % below
        };
        let mut outcomes = [0; 2];
        for _ in 0..3000 {
            let len = 1 + random(6) as usize;
            let ops: Vec<_> = (0..len)
                .map(|id| {
                    let call = random(20);
                    let ret = (random(6) != 0).then(|| call + random(10));
                    let input =
                        if random(2) == 0 { RegIn::Write(1 + random(2)) } else { RegIn::Read };
                    let output = match (&input, ret) {
                        (_, None) => RegOut::Unknown,
                        (RegIn::Write(_), Some(_)) => RegOut::Ok,
                        (RegIn::Read, Some(_)) => RegOut::Value(random(3)),
                    };
                    op(id, call, ret, input, output)
                })
                .collect();
            let expected = brute_force(&ops, &mut vec![false; len], &[0]);
            let verdict = check_register(&ops);
            assert_eq!(verdict == Verdict::Linearizable, expected, "{ops:?}: {verdict:?}");
            outcomes[usize::from(expected)] += 1;
        }
        assert!(outcomes.iter().all(|&n| n > 300), "{outcomes:?}");
    }

    /// `writes` fully concurrent writes of distinct values and a concurrent read of a value
    /// nobody wrote: not linearizable, but only after trying every subset of the writes.
    fn exploding_history(writes: usize) -> Vec<Operation<RegIn, RegOut>> {
        let end = 1_000_000;
        let mut ops: Vec<_> =
            (0..writes).map(|i| write(i, i as u64, end + i as u64, i as u64 + 1)).collect();
        ops.push(read(writes, writes as u64, end + writes as u64, u64::MAX));
        ops
    }

    #[test]
    fn exploding_search_is_refuted_when_small() {
        assert!(matches!(check_register(&exploding_history(8)), Verdict::NotLinearizable(_)));
    }

    #[test]
    fn exploding_search_runs_out_of_budget() {
        let started = Instant::now();
        let verdict = check(&Register, &exploding_history(199), Duration::from_millis(1));
        assert!(matches!(verdict, Verdict::Unknown { explored } if explored > 0), "{verdict:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "the budget was not honoured");
    }
}
