//! Every flag of every subcommand says what it does in `--help`.

use std::process::Command;

/// The subcommands whose flags a user reads.
const COMMANDS: &[&[&str]] = &[
    &["gui"],
    &["toy"],
    &["features", "inspect"],
    &["features", "project"],
    &["prior", "train"],
    &["prior", "eval"],
    &["prior", "sample"],
    &["ae", "train"],
    &["ae", "eval"],
    &["ae", "encode"],
    &["bench"],
];

/// The flags (`--name`) listed in `help` with no description.
fn undocumented(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        // A flag line starts `--name` or `-n, --name`; `- value: ...` lines list possible values.
        let is_flag = trimmed.starts_with("--")
            || (trimmed.starts_with('-')
                && trimmed[1..].starts_with(|c: char| c.is_ascii_alphabetic()));
        if !is_flag {
            continue;
        }
        let flag = trimmed
            .split([' ', ','])
            .find(|w| w.starts_with("--"))
            .unwrap_or(trimmed)
            .to_string();
        // Short help puts the description after two spaces; wrapped help on the next line. A
        // default or a list of values alone is no description.
        let says = |text: &str| {
            let words = text.trim();
            !words.is_empty() && !words.starts_with('[')
        };
        let same_line = trimmed.split("  ").skip(1).any(&says);
        let next_line = lines.get(i + 1).is_some_and(|next| {
            let indent = next.len() - next.trim_start().len();
            indent > line.len() - trimmed.len() && !next.trim_start().starts_with('-') && says(next)
        });
        if !(same_line || next_line) {
            out.push(flag);
        }
    }
    out
}

#[test]
fn every_flag_has_help() {
    let mut missing = Vec::new();
    for args in COMMANDS {
        let out = Command::new(env!("CARGO_BIN_EXE_flowalign"))
            .args(*args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?} --help failed");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Options:"), "{args:?}: {help}");
        for flag in undocumented(&help) {
            missing.push(format!("flowalign {} {flag}", args.join(" ")));
        }
    }
    assert!(
        missing.is_empty(),
        "flags without help:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_checker_sees_a_flag_without_help() {
    let help = "Options:\n      --seed <SEED>\n      --steps <STEPS>  Optimiser steps\n      --lr <LR>\n          Peak learning rate\n      --batch <BATCH>  [default: 32]\n";
    assert_eq!(
        undocumented(help),
        vec!["--seed".to_string(), "--batch".to_string()]
    );
}
