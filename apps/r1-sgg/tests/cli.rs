//! The command line on bad input: every case exits non-zero with a message
//! that names the flag or file at fault, and never panics.

use std::path::PathBuf;
use std::process::Command;

/// Runs `r1-sgg args` in a scratch folder; returns (success, stderr).
fn run(args: &[impl AsRef<std::ffi::OsStr>]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_r1-sgg"))
        .args(args)
        .current_dir(scratch())
        .output()
        .expect("the binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("r1_sgg_cli_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Asserts that `args` fail with a message containing each of `names`.
fn refused(args: &[impl AsRef<std::ffi::OsStr> + std::fmt::Debug], names: &[&str]) {
    let (ok, err) = run(args);
    assert!(!ok, "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    for name in names {
        assert!(err.contains(name), "{args:?}: {name:?} not in:\n{err}");
    }
}

#[test]
fn out_of_range_flags_are_refused_at_parse_time() {
    let cases: &[(&[&str], &str)] = &[
        (&["sft", "--train-size", "0"], "--train-size"),
        (&["sft", "--batch", "0"], "--batch"),
        (&["sft", "--sft-lr", "0"], "--sft-lr"),
        (&["sft", "--sft-lr", "nan"], "--sft-lr"),
        (&["sft", "--eval-size", "0"], "--eval-size"),
        (&["sft", "--max-new", "0"], "--max-new"),
        (&["grpo", "--grpo-lr=-1"], "--grpo-lr"),
        (&["grpo", "--grpo-lr", "inf"], "--grpo-lr"),
        (&["grpo", "--group", "0"], "--group"),
        (&["grpo", "--group", "1"], "--group"),
        (&["grpo", "--prompts", "0"], "--prompts"),
        (&["grpo", "--inner-steps", "0"], "--inner-steps"),
        (&["grpo", "--beta=-0.1"], "--beta"),
        (&["grpo", "--temperature", "0"], "--temperature"),
        (&["grpo", "--reward-weights=-1,2,5"], "--reward-weights"),
        (&["demo", "--device", "tpu"], "--device"),
        (&["demo", "--preset", "huge"], "--preset"),
    ];
    for (args, flag) in cases {
        refused(args, &[flag]);
    }
}

/// One SFT step on two generated images, with `extra` flags.
fn sft(extra: [&str; 2]) -> Vec<&str> {
    let tiny = [
        "sft",
        "--train-size",
        "2",
        "--eval-size",
        "1",
        "--sft-steps",
        "1",
        "--batch",
        "1",
    ];
    tiny.into_iter().chain(extra).collect()
}

#[test]
fn missing_or_empty_files_are_named() {
    let dir = scratch();
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let empty = empty.to_str().unwrap();
    refused(&sft(["--data", empty]), &["--data", "empty.jsonl"]);
    refused(&sft(["--eval-data", empty]), &["--eval-data", "empty.jsonl"]);
    refused(
        &sft(["--init", "nope.safetensors"]),
        &["--init", "nope.safetensors"],
    );
    refused(&sft(["--data", "missing.jsonl"]), &["missing.jsonl"]);
}

#[test]
fn model_flags_are_checked() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/qwen2_vl/untied");
    let tiny = ["--train-size", "2", "--eval-size", "1", "--sft-steps", "1"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        ["sft", "--model", fixture]
            .into_iter()
            .chain(tiny)
            .chain(extra.iter().copied())
            .collect()
    };
    refused(&with(&["--init", "x.safetensors"]), &["--init", "--model"]);
    refused(
        &with(&["--batch", "3", "--accumulate", "2"]),
        &["--batch 3", "--accumulate 2"],
    );
    refused(&with(&["--max-pixels", "100"]), &["--max-pixels"]);
    refused(
        &with(&["--shuffle", "--augment", "none"]),
        &["--shuffle", "--augment"],
    );
    refused(
        &["sft", "--model", "no/such/model"],
        &["--model", "no/such/model"],
    );
    refused(&["demo", "--model", fixture], &["--model"]);
    refused(
        &[
            "grpo",
            "--model",
            fixture,
            "--train-size",
            "2",
            "--eval-size",
            "1",
            "--freeze-box-tokens",
        ],
        &["--freeze-box-tokens"],
    );
}
