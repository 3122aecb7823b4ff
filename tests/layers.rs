//! The crate's module graph: `scripts/check-layers.py` holds it to the layer order in
//! `src/lib.rs` (no cycles, every arrow down). The script is tested on small trees
//! first, so a check that stopped seeing imports could not pass by accident.

use std::fs;
use std::path::Path;
use std::process::Command;

fn check(src: &Path) -> (bool, String) {
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check-layers.py"))
        .arg("--src")
        .arg(src)
        .output()
        .expect("python3 runs scripts/check-layers.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let path = dir.path().join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }
    dir
}

const LIB: &str = "//! layers:begin\n//! main\n//! high\n//! low other\n//! layers:end\n\
                   pub mod high;\npub mod low;\npub mod other;\n";

#[test]
fn the_crate_has_no_module_cycle_and_every_arrow_points_down() {
    let (ok, text) = check(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(ok, "{text}");
    assert!(text.contains("module → what it uses"), "{text}");
}

#[test]
fn the_check_passes_a_tree_that_points_down() {
    let dir = tree(&[
        ("lib.rs", LIB),
        ("main.rs", "mod cli;\nuse audiocap::high::Thing;\n"),
        ("cli/mod.rs", "pub mod run;\n"),
        (
            "cli/run.rs",
            "use audiocap::low::{self, Item};\nuse crate::cli::mod_item;\n",
        ),
        ("high/mod.rs", "pub mod a;\npub mod b;\npub use a::Thing;\n"),
        (
            "high/a.rs",
            "use super::b::Helper;\nuse crate::low::Item;\n",
        ),
        (
            "high/b.rs",
            "// use super::a::Thing; (a comment)\nconst S: &str = \"super::a::x\";\n",
        ),
        ("low.rs", "pub struct Item;\n"),
        (
            "other.rs",
            "#[cfg(test)]\nmod tests {\n    use crate::high::Thing;\n}\n",
        ),
    ]);
    let (ok, text) = check(dir.path());
    assert!(ok, "{text}");
    assert!(text.contains("high       → low"), "{text}");
    assert!(text.contains("high/a → high/b"), "{text}");
}

#[test]
fn the_check_fails_on_an_upward_arrow_a_peer_and_a_cycle_through_a_reexport() {
    let dir = tree(&[
        ("lib.rs", LIB),
        ("main.rs", ""),
        ("high/mod.rs", "pub mod a;\npub mod b;\npub use a::Thing;\n"),
        // b reaches a through the re-export in mod.rs; a uses b: a cycle.
        ("high/a.rs", "use super::b::Helper;\n"),
        ("high/b.rs", "fn f() -> super::Thing { todo() }\n"),
        ("low.rs", "fn f() { crate::high::a::g(); }\n"),
        ("other.rs", "use crate::low::Item;\n"),
    ]);
    let (ok, text) = check(dir.path());
    assert!(!ok, "{text}");
    assert!(
        text.contains("`low` uses `high`, which is not below it"),
        "{text}"
    );
    assert!(
        text.contains("`other` uses `low`, which is not below it"),
        "{text}"
    );
    assert!(text.contains("file cycle: high/a ↔ high/b"), "{text}");
}
