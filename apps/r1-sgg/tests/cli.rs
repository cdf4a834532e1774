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
fn malformed_parquet_rows_are_named_or_skipped_and_counted() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/parquet");
    let bad = fixtures.join("bad/rows.parquet");
    let bad = bad.to_str().unwrap();
    refused(&sft(["--data", bad]), &["rows.parquet", "row 1", "invalid JSON"]);
    // Skipped: the shard's one good row trains, and the nine others are
    // counted as the stream passes them (two draws of one sample: the whole
    // first epoch is passed, and each bad row is counted once).
    let out = scratch().join("skipped");
    let mut args = sft(["--data", bad]);
    let steps = args
        .iter()
        .position(|a| *a == "--sft-steps")
        .expect("--sft-steps")
        + 1;
    args[steps] = "2";
    args.extend(["--skip-bad-rows", "--out", out.to_str().unwrap()]);
    let run = Command::new(env!("CARGO_BIN_EXE_r1-sgg"))
        .args(&args)
        .current_dir(scratch())
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("--data: skipped 9 malformed records"), "{stdout}");
    // The stream counts the shard's rows, bad ones included.
    assert!(stdout.contains("data: 10 train"), "{stdout}");
    // A shard compressed with a codec this build lacks is never skipped.
    let zstd = fixtures.join("bad/zstd.parquet");
    let mut args = sft(["--data", zstd.to_str().unwrap()]);
    args.push("--skip-bad-rows");
    refused(&args, &["zstd.parquet", "ZSTD"]);
}

/// Runs `r1-sgg args`; returns (success, stdout, stderr).
fn run_out(args: &[impl AsRef<std::ffi::OsStr>]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_r1-sgg"))
        .args(args)
        .current_dir(scratch())
        .output()
        .expect("the binary runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn eval_records_scores_saved_answers() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/r1_sgg_eval/vg150");
    let records = format!("{fixtures}/records.jsonl");
    let out = scratch().join("eval_records.json");
    let gathered = scratch().join("sgg_pred_results.json");
    let (ok, stdout, stderr) = run_out(&[
        "eval-records",
        "--records",
        &records,
        "--data",
        "vg150",
        "--out",
        out.to_str().unwrap(),
        "--write-gathered",
        gathered.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    // R1-SGG's numbers for these records (expected.json, from its own code).
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{fixtures}/expected.json")).unwrap()).unwrap();
    let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for k in [20u64, 50, 100] {
        let ours = written["summary"]["recall"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e[0].as_u64() == Some(k))
            .unwrap()[1]
            .as_f64();
        // Summed in another order than numpy's mean: equal to the last bits.
        let theirs = expected["summary"]["recall"][k.to_string()].as_f64().unwrap();
        assert!(
            (ours.unwrap() - theirs).abs() < 1e-12,
            "R@{k}: {ours:?} vs {theirs}"
        );
    }
    let failures = expected["summary"]["failures"].as_u64().unwrap();
    assert!(stdout.contains(&format!("({failures} of 200)")), "{stdout}");
    let r_line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("R "))
        .unwrap()
        .to_string();
    // The gathered predictions, scored again, give the same recall.
    let (ok, again, stderr) = run_out(&[
        "eval-records",
        "--records",
        &records,
        "--data",
        "vg150",
        "--predictions",
        gathered.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(again.contains(&r_line), "{again}");
    // The strict evaluation of the same records.
    let (ok, strict, stderr) = run_out(&[
        "eval-records",
        "--records",
        &records,
        "--data",
        "vg150",
        "--strict",
    ]);
    assert!(ok && strict.contains("| strict |"), "{strict}{stderr}");
    // R1-SGG's own records carry no image size: --image-sizes is asked for.
    let folder = scratch().join("r1_sgg_records");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("7.json"),
        r#"{"image_id": "7", "response": "", "gt_objects": "[]", "gt_relationships": "[]", "box_scale": [1000.0, 1000.0]}"#,
    )
    .unwrap();
    refused(
        &[
            "eval-records",
            "--records",
            folder.to_str().unwrap(),
            "--data",
            "psg",
        ],
        &["image 7", "--image-sizes"],
    );
    refused(
        &["eval-records", "--records", "nowhere.jsonl", "--data", "vg150"],
        &["nowhere.jsonl"],
    );
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
