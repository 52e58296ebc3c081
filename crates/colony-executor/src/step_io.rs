//! A process attempt's files in and out: its inputs written to `DIR/input` (owned by the executor,
//! readable by the attempt, `$COLONY_INPUT_DIR`) before it starts, and, when it succeeds, the
//! files it left in `DIR/output` (its own, `$COLONY_OUTPUT_DIR`) read back as its outputs.
//!
//! The output directory belongs to the task's user, so nothing in it is trusted: only regular
//! files that user owns are read (never through a symlink, never a FIFO), each within the named
//! limits, checked by size before a byte is read.

use colony_core::{Limits, Outputs, WorkflowLimits};
use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What an attempt receives and must leave behind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct StepIo {
    pub inputs: Outputs,
    /// The outputs a workflow step declares: each must be there when it succeeds.
    pub declared: BTreeSet<String>,
}

pub(crate) fn input_dir(dir: &Path) -> PathBuf {
    dir.join("input")
}

pub(crate) fn output_dir(dir: &Path) -> PathBuf {
    dir.join("output")
}

/// A name the server sent that is safe as a file name in the input directory.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 255
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Writes the inputs (readable, not writable, by the attempt) and creates the empty output
/// directory, which `own` hands to the attempt's user.
pub(crate) fn prepare(
    dir: &Path,
    io: &StepIo,
    own: impl Fn(&Path) -> std::io::Result<()>,
) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let input = input_dir(dir);
    std::fs::create_dir(&input).map_err(|e| format!("cannot create {}: {e}", input.display()))?;
    for (name, data) in &io.inputs {
        if !safe_name(name) {
            return Err(format!("input name {name:?} is not a plain file name"));
        }
        let path = input.join(name);
        std::fs::write(&path, data).map_err(|e| format!("cannot write input {name}: {e}"))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444))
            .map_err(|e| format!("cannot write input {name}: {e}"))?;
    }
    std::fs::set_permissions(&input, std::fs::Permissions::from_mode(0o555))
        .map_err(|e| format!("cannot prepare {}: {e}", input.display()))?;
    let output = output_dir(dir);
    std::fs::create_dir(&output).map_err(|e| format!("cannot create {}: {e}", output.display()))?;
    own(&output).map_err(|e| format!("cannot prepare {}: {e}", output.display()))
}

/// Reads back what a successful attempt left in its output directory. `owner`: the uid its files
/// must have (the attempt's user), when the attempt ran as another user. `Err` is why the attempt
/// fails instead.
pub(crate) fn collect(
    dir: &Path,
    declared: &BTreeSet<String>,
    owner: Option<u32>,
) -> Result<Outputs, String> {
    let limits = Limits::default();
    let wl = WorkflowLimits::default();
    let output = output_dir(dir);
    let entries =
        std::fs::read_dir(&output).map_err(|e| format!("cannot read $COLONY_OUTPUT_DIR: {e}"))?;
    let mut found = Vec::new();
    for entry in entries.take(wl.outputs_per_step_max + 1) {
        let entry = entry.map_err(|e| format!("cannot read $COLONY_OUTPUT_DIR: {e}"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Not followed: a symlink is not a regular file here.
        let meta = std::fs::symlink_metadata(entry.path())
            .map_err(|e| format!("cannot read output {name}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("output {name} is not a regular file (a directory or a link?)"));
        }
        found.push((name, meta.len() as usize));
    }
    wl.check_outputs(limits.name_bytes_max, found.iter().map(|(n, len)| (n.as_str(), *len)))?;
    let missing: Vec<&str> = declared
        .iter()
        .filter(|d| !found.iter().any(|(n, _)| n == *d))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the step did not write its declared output{} {} to $COLONY_OUTPUT_DIR",
            if missing.len() == 1 { "" } else { "s" },
            missing.join(", ")
        ));
    }
    let mut outputs = Outputs::new();
    for (name, _) in found {
        let data = read_output(&output.join(&name), owner, wl.output_bytes_max)
            .map_err(|e| format!("cannot read output {name}: {e}"))?;
        outputs.insert(name, data);
    }
    Ok(outputs)
}

/// Reads one output file without following a link or blocking on a FIFO, checking what was
/// opened (not the name) and reading at most `max` bytes.
fn read_output(path: &Path, owner: Option<u32>, max: usize) -> Result<Vec<u8>, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    if let Some(uid) = owner.filter(|&uid| uid != meta.uid()) {
        return Err(format!("owned by uid {}, not the task's user (uid {uid})", meta.uid()));
    }
    let mut data = Vec::with_capacity((meta.len() as usize).min(max));
    file.take(max as u64 + 1).read_to_end(&mut data).map_err(|e| e.to_string())?;
    if data.len() > max {
        return Err(format!("grew past the {max}-byte limit while being read"));
    }
    Ok(data)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that cannot set up or whose check fails should panic.
mod tests {
    use super::*;

    fn no_owner(_: &Path) -> std::io::Result<()> {
        Ok(())
    }

    #[test]
    fn inputs_are_written_and_outputs_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let io = StepIo {
            inputs: Outputs::from([("notes".to_owned(), b"hello".to_vec())]),
            declared: BTreeSet::from(["report".to_owned()]),
        };
        prepare(dir.path(), &io, no_owner).unwrap();
        assert_eq!(std::fs::read(dir.path().join("input/notes")).unwrap(), b"hello");
        std::fs::write(dir.path().join("output/report"), b"done").unwrap();
        std::fs::write(dir.path().join("output/extra"), b"x").unwrap();
        let outputs = collect(dir.path(), &io.declared, None).unwrap();
        assert_eq!(outputs.get("report").map(Vec::as_slice), Some(&b"done"[..]));
        assert_eq!(outputs.len(), 2);
    }

    #[test]
    fn bad_outputs_fail_the_attempt_with_a_reason() {
        let wl = WorkflowLimits::default();
        let case = |setup: &dyn Fn(&Path), declared: &[&str], expected: &str| {
            let dir = tempfile::tempdir().unwrap();
            prepare(dir.path(), &StepIo::default(), no_owner).unwrap();
            setup(&output_dir(dir.path()));
            let declared = declared.iter().map(|s| s.to_string()).collect();
            let error = collect(dir.path(), &declared, None).unwrap_err();
            assert!(error.contains(expected), "{error:?} should contain {expected:?}");
        };
        case(&|_| {}, &["report"], "did not write its declared output report");
        case(
            &|out| std::fs::write(out.join("big"), vec![0; wl.output_bytes_max + 1]).unwrap(),
            &[],
            "output big is 262145 bytes; the limit is 262144 bytes per output",
        );
        case(
            &|out| std::os::unix::fs::symlink("/etc/passwd", out.join("secret")).unwrap(),
            &[],
            "output secret is not a regular file",
        );
        case(
            &|out| std::fs::create_dir(out.join("sub")).unwrap(),
            &[],
            "output sub is not a regular file",
        );
        case(
            &|out| {
                for i in 0..5 {
                    std::fs::write(out.join(format!("part{i}")), vec![0; 250 << 10]).unwrap();
                }
            },
            &[],
            "outputs total 1280000 bytes; the limit is 1048576 bytes per task",
        );
    }

    #[test]
    fn unsafe_input_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let io = StepIo {
            inputs: Outputs::from([("../escape".to_owned(), b"x".to_vec())]),
            declared: BTreeSet::new(),
        };
        let error = prepare(dir.path(), &io, no_owner).unwrap_err();
        assert!(error.contains("not a plain file name"), "{error}");
        assert!(!dir.path().join("escape").exists());
    }

    #[test]
    fn a_file_of_another_owner_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path(), &StepIo::default(), no_owner).unwrap();
        std::fs::write(output_dir(dir.path()).join("x"), b"x").unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let error = collect(dir.path(), &BTreeSet::new(), Some(me.wrapping_add(1))).unwrap_err();
        assert!(error.contains("not the task's user"), "{error}");
    }
}
