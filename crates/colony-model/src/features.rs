//! The feature schema: how a task (and the executor it runs on) becomes the model's input vector,
//! and how a runtime and a peak memory become its targets.
//!
//! Schema `colony-features-v1`, [`FEATURES`] values, in this order:
//!
//! | index  | feature |
//! |--------|---------|
//! | 0..16  | the task's kind ([`kind`]: its name without a trailing `-<digits>`), one-hot in 16 hashed buckets |
//! | 16..20 | the namespace, one-hot in 4 hashed buckets |
//! | 20     | ln(1 + requested CPU millicores) |
//! | 21     | ln(1 + requested memory in MiB); 0 when memory is sized automatically |
//! | 22     | 1 when memory is sized automatically (`memory_auto`), else 0 |
//! | 23     | requested GPUs |
//! | 24..32 | the required labels, each `key=value` setting one of 8 hashed buckets to 1 |
//! | 32     | the number of arguments of a process task (0 for a builtin) |
//! | 33     | ln(1 + total bytes of those arguments) |
//! | 34     | 1 for a builtin handler, 0 for a process |
//! | 35     | ln(1 + seconds) of a builtin's input read as a humantime duration (`sleep`'s input: `2s`, `150ms`); 0 if it is not one |
//! | 36     | 1 when the executor is known, else 0 (and 37..42 are 0) |
//! | 37     | ln(1 + the executor's CPU capacity in cores) |
//! | 38     | ln(1 + the executor's memory capacity in GiB) |
//! | 39..43 | the executor's labels, each `key=value` setting one of 4 hashed buckets to 1 |
//!
//! Buckets are FNV-1a 64 of the UTF-8 bytes modulo the bucket count: a fixed, documented function,
//! so every process and every release computes the same features (std's hasher is seeded per
//! process). Quantities enter as logarithms because runtimes and sizes span orders of magnitude,
//! and the targets are logarithms for the same reason; a duration enters as ln(1 + seconds) so that
//! `sleep 30s` relates linearly to ln(1 + runtime ms). Changing anything here changes the
//! schema's name: a model is only ever fed the features it was trained on.

use colony_core::{ExecutorSpec, RunSpec, TaskSpec};

/// The name of this feature layout, stored with every model.
pub const SCHEMA: &str = "colony-features-v1";
/// The length of a feature vector.
pub const FEATURES: usize = 43;
/// The length of a target vector: ln(1 + runtime ms), ln(1 + peak memory bytes).
pub const TARGETS: usize = 2;
/// A longer runtime is taken for a clock error, not a measurement: no example is accepted above
/// it and no prediction exceeds it.
pub const RUNTIME_MS_MAX: u64 = 7 * 24 * 60 * 60 * 1000;
/// A larger peak is taken for a measurement error (no executor has that much memory): no example
/// is accepted above it and no prediction exceeds it.
pub const PEAK_MEMORY_BYTES_MAX: u64 = 16 << 40;

const KIND_BUCKETS: usize = 16;
const NAMESPACE_BUCKETS: usize = 4;
const LABEL_BUCKETS: usize = 8;
const EXECUTOR_LABEL_BUCKETS: usize = 4;

const KIND_AT: usize = 0;
const NAMESPACE_AT: usize = KIND_AT + KIND_BUCKETS;
const CPU_AT: usize = NAMESPACE_AT + NAMESPACE_BUCKETS;
const MEMORY_AT: usize = CPU_AT + 1;
const MEMORY_AUTO_AT: usize = MEMORY_AT + 1;
const GPUS_AT: usize = MEMORY_AUTO_AT + 1;
const LABELS_AT: usize = GPUS_AT + 1;
const ARGS_AT: usize = LABELS_AT + LABEL_BUCKETS;
const ARGS_BYTES_AT: usize = ARGS_AT + 1;
const BUILTIN_AT: usize = ARGS_BYTES_AT + 1;
const DURATION_AT: usize = BUILTIN_AT + 1;
const EXECUTOR_KNOWN_AT: usize = DURATION_AT + 1;
const EXECUTOR_CORES_AT: usize = EXECUTOR_KNOWN_AT + 1;
const EXECUTOR_MEMORY_AT: usize = EXECUTOR_CORES_AT + 1;
const EXECUTOR_LABELS_AT: usize = EXECUTOR_MEMORY_AT + 1;
const END: usize = EXECUTOR_LABELS_AT + EXECUTOR_LABEL_BUCKETS;
// The table above and FEATURES must describe the same layout.
const _: () = assert!(END == FEATURES);

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

/// FNV-1a, 64-bit (offset basis 0xcbf29ce484222325, prime 0x100000001b3).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn bucket(text: &str, buckets: usize) -> usize {
    // buckets is a small constant, so both conversions are exact.
    (fnv1a64(text.as_bytes()) % buckets as u64) as usize
}

/// The task's kind: its name with a trailing `-<digits>` removed, so `etl-17` and `etl-3` are
/// both `etl`. A name that is only `-<digits>` is its own kind.
pub fn kind(task: &TaskSpec) -> String {
    kind_of(&task.name).to_owned()
}

fn kind_of(name: &str) -> &str {
    match name.rsplit_once('-') {
        Some((stem, digits))
            if !stem.is_empty()
                && !digits.is_empty()
                && digits.bytes().all(|byte| byte.is_ascii_digit()) =>
        {
            stem
        }
        _ => name,
    }
}

fn ln1p(x: f64) -> f32 {
    x.ln_1p() as f32
}

/// The feature vector of `task` running on `executor` (`None` when the executor is unknown).
pub fn features(task: &TaskSpec, executor: Option<&ExecutorSpec>) -> [f32; FEATURES] {
    let mut f = [0.0_f32; FEATURES];
    f[KIND_AT + bucket(kind_of(&task.name), KIND_BUCKETS)] = 1.0;
    f[NAMESPACE_AT + bucket(&task.namespace, NAMESPACE_BUCKETS)] = 1.0;
    f[CPU_AT] = ln1p(task.resources.cpu_millis as f64);
    if task.memory_auto {
        f[MEMORY_AUTO_AT] = 1.0;
    } else {
        f[MEMORY_AT] = ln1p(task.resources.memory_bytes as f64 / MIB);
    }
    f[GPUS_AT] = task.resources.gpus as f32;
    for (key, value) in &task.labels {
        f[LABELS_AT + bucket(&format!("{key}={value}"), LABEL_BUCKETS)] = 1.0;
    }
    match &task.run {
        RunSpec::Process { args, .. } => {
            f[ARGS_AT] = args.len() as f32;
            let bytes: usize = args.iter().map(String::len).sum();
            f[ARGS_BYTES_AT] = ln1p(bytes as f64);
        }
        RunSpec::Builtin { input, .. } => {
            f[BUILTIN_AT] = 1.0;
            if let Ok(duration) = humantime::parse_duration(input.trim()) {
                f[DURATION_AT] = ln1p(duration.as_secs_f64());
            }
        }
    }
    if let Some(executor) = executor {
        f[EXECUTOR_KNOWN_AT] = 1.0;
        f[EXECUTOR_CORES_AT] = ln1p(executor.capacity.cpu_millis as f64 / 1000.0);
        f[EXECUTOR_MEMORY_AT] = ln1p(executor.capacity.memory_bytes as f64 / GIB);
        for (key, value) in &executor.labels {
            f[EXECUTOR_LABELS_AT + bucket(&format!("{key}={value}"), EXECUTOR_LABEL_BUCKETS)] = 1.0;
        }
    }
    f
}

/// The targets of an observed run: [ln(1 + runtime ms), ln(1 + peak memory bytes)].
pub fn targets(runtime_ms: f64, peak_memory_bytes: f64) -> [f32; TARGETS] {
    [ln1p(runtime_ms), ln1p(peak_memory_bytes)]
}

/// The inverse of [`targets`]: (runtime ms, peak memory bytes).
pub fn from_targets(targets: [f32; TARGETS]) -> (f64, f64) {
    (f64::from(targets[0]).exp_m1(), f64::from(targets[1]).exp_m1())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{executor, process_task};

    #[test]
    fn fnv1a64_matches_the_published_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn kind_strips_a_trailing_number() {
        for (name, expected) in [
            ("etl-17", "etl"),
            ("etl-3", "etl"),
            ("etl", "etl"),
            ("a-b-42", "a-b"),
            ("etl-", "etl-"),
            ("etl-x1", "etl-x1"),
            ("-7", "-7"),
            ("v2", "v2"),
        ] {
            assert_eq!(kind(&process_task(name, &[])), expected, "{name}");
        }
        let features_of = |name: &str| features(&process_task(name, &[]), None);
        assert_eq!(features_of("etl-17"), features_of("etl-3"));
        assert_eq!(features_of("etl-17"), features_of("etl"));
    }

    #[test]
    fn features_are_deterministic_and_laid_out_as_documented() {
        let mut task = process_task("etl-17", &["--rows", "1000"]);
        task.labels.insert("zone".to_owned(), "a".to_owned());
        let exec = executor();
        let f = features(&task, Some(&exec));
        assert_eq!(f, features(&task.clone(), Some(&exec.clone())));
        assert!(f.iter().all(|x| x.is_finite()));
        assert_eq!(f[KIND_AT..NAMESPACE_AT].iter().sum::<f32>(), 1.0);
        assert_eq!(f[KIND_AT + bucket("etl", KIND_BUCKETS)], 1.0);
        assert_eq!(f[NAMESPACE_AT..CPU_AT].iter().sum::<f32>(), 1.0);
        assert_eq!(f[CPU_AT], 501.0_f64.ln() as f32);
        assert_eq!(f[MEMORY_AT], 257.0_f64.ln() as f32);
        assert_eq!(f[MEMORY_AUTO_AT], 0.0);
        assert_eq!(f[LABELS_AT + bucket("zone=a", LABEL_BUCKETS)], 1.0);
        assert_eq!(f[ARGS_AT], 2.0);
        assert_eq!(f[ARGS_BYTES_AT], 11.0_f64.ln() as f32);
        assert_eq!((f[BUILTIN_AT], f[DURATION_AT]), (0.0, 0.0));
        assert_eq!(f[EXECUTOR_KNOWN_AT], 1.0);
        assert_eq!(f[EXECUTOR_CORES_AT], 9.0_f64.ln() as f32);
        assert_eq!(f[EXECUTOR_MEMORY_AT], 17.0_f64.ln() as f32);
        assert_eq!(f[EXECUTOR_LABELS_AT..END].iter().sum::<f32>(), 1.0, "{f:?}");

        let unknown = features(&task, None);
        assert!(unknown[EXECUTOR_KNOWN_AT..END].iter().all(|&x| x == 0.0));
        assert_eq!(unknown[..EXECUTOR_KNOWN_AT], f[..EXECUTOR_KNOWN_AT]);

        task.memory_auto = true;
        let auto = features(&task, None);
        assert_eq!((auto[MEMORY_AT], auto[MEMORY_AUTO_AT]), (0.0, 1.0));
    }

    #[test]
    fn builtin_sleep_reads_its_duration() {
        let mut task = process_task("nap-1", &[]);
        task.run = RunSpec::Builtin { handler: "sleep".to_owned(), input: "2s".to_owned() };
        let f = features(&task, None);
        assert_eq!(f[BUILTIN_AT], 1.0);
        assert_eq!(f[DURATION_AT], 3.0_f64.ln() as f32);
        assert_eq!((f[ARGS_AT], f[ARGS_BYTES_AT]), (0.0, 0.0));
        task.run = RunSpec::Builtin { handler: "echo".to_owned(), input: "hello".to_owned() };
        assert_eq!(features(&task, None)[DURATION_AT], 0.0);
    }

    #[test]
    fn targets_round_trip() {
        let t = targets(1500.0, 64.0 * MIB);
        assert_eq!(t[0], 1501.0_f64.ln() as f32);
        let (ms, bytes) = from_targets(t);
        assert!((ms / 1500.0 - 1.0).abs() < 1e-5, "{ms}");
        assert!((bytes / (64.0 * MIB) - 1.0).abs() < 1e-5, "{bytes}");
    }
}
