//! The one way a settings file is loaded: pipeline files, training files,
//! pre-training settings and the corpus definition all come through here.
//!
//! Loading is in three steps so that a bad file gets every problem listed at once:
//! 1. the TOML is parsed and `--set section.key=value` overrides are applied;
//! 2. every key of every section is deserialised on its own (all fields have
//!    defaults), so each unknown key or wrong type is its own problem instead of
//!    serde stopping at the first one;
//! 3. the file's own `validate` checks values and combinations without any I/O, on
//!    what is left once the keys of step 2's problems are set aside.
//!
//! A problem is a [`ConfigProblem`]: where (`section.key`, `section`, `--set …`, or
//! nothing for the file as a whole) and what. [`DeviceSpec`] is the one device
//! grammar (`cpu`, `cuda`, `cuda:N`, any case) every file uses; [`audiocap_home`]
//! the one rule for audiocap's own folder.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::de::DeserializeOwned;

/// One thing wrong with a settings file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// `section.key`, `section` or `--set` (empty for the file as a whole).
    pub at: String,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.at.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.at, self.message)
        }
    }
}

/// A [`ConfigProblem`] at `at`.
pub fn problem(at: impl Into<String>, message: impl Into<String>) -> ConfigProblem {
    ConfigProblem {
        at: at.into(),
        message: message.into(),
    }
}

/// Every problem found in one settings file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    /// The file as given.
    pub file: String,
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} problem{}",
            self.file,
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// What a file type brings to the loader: its key-by-key check (step 2: usually
/// [`check_sections`] over its sections, or [`check_section`] with no section name
/// for a flat file) and its value check (step 3).
pub struct Schema<T> {
    pub check_keys: fn(&toml::Table) -> Vec<ConfigProblem>,
    pub validate: fn(&T) -> Result<(), Vec<ConfigProblem>>,
    /// Keys at the top level, no sections: overrides are `--set key=value`.
    pub flat: bool,
}

/// Reads, overrides and checks a settings file (see the module documentation).
pub fn load<T: DeserializeOwned>(
    path: &Path,
    overrides: &[String],
    schema: &Schema<T>,
) -> Result<T, ConfigErrors> {
    complete(
        &path.display().to_string(),
        load_partial(path, overrides, schema),
    )
}

/// [`load`] on text already read; `file` names it in messages.
pub fn parse<T: DeserializeOwned>(
    text: &str,
    file: &str,
    overrides: &[String],
    schema: &Schema<T>,
) -> Result<T, ConfigErrors> {
    complete(file, parse_partial(text, overrides, schema))
}

/// [`load`] for a caller that checks several files together (the corpus definition):
/// every problem, and with them the value that is left once the keys they name are
/// set aside (their defaults stand in), so the caller can go on checking the other
/// files against it. `None` when even that does not deserialise (the file cannot be
/// read or is not TOML, or a required key is missing).
pub fn load_partial<T: DeserializeOwned>(
    path: &Path,
    overrides: &[String],
    schema: &Schema<T>,
) -> (Option<T>, Vec<ConfigProblem>) {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_partial(&text, overrides, schema),
        Err(e) => (
            None,
            vec![problem("", format!("cannot read the file: {e}"))],
        ),
    }
}

/// [`load_partial`] on text already read.
pub fn parse_partial<T: DeserializeOwned>(
    text: &str,
    overrides: &[String],
    schema: &Schema<T>,
) -> (Option<T>, Vec<ConfigProblem>) {
    let mut table: toml::Table = match toml::from_str(text) {
        Ok(table) => table,
        Err(e) => return (None, vec![problem("", format!("not valid TOML: {e}"))]),
    };
    let mut problems = Vec::new();
    for o in overrides {
        if let Err(p) = apply_override(&mut table, o, schema.flat) {
            problems.push(p);
        }
    }
    problems.extend((schema.check_keys)(&table));
    // The values are checked too, on what is left once the keys named above are set
    // aside (their defaults stand in), so one pass lists every problem.
    set_aside(&mut table, &problems);
    match toml::Value::Table(table).try_into::<T>() {
        Ok(config) => {
            problems.extend((schema.validate)(&config).err().unwrap_or_default());
            (Some(config), problems)
        }
        Err(e) => {
            problems.push(problem("", e.message().trim().to_string()));
            (None, problems)
        }
    }
}

/// The value when nothing is wrong, else every problem of `file`.
fn complete<T>(
    file: &str,
    (config, problems): (Option<T>, Vec<ConfigProblem>),
) -> Result<T, ConfigErrors> {
    match config {
        Some(config) if problems.is_empty() => Ok(config),
        _ => Err(ConfigErrors {
            file: file.to_string(),
            problems,
        }),
    }
}

/// Applies one `section.key=value` override (`key=value` in a flat file). The value
/// is read as TOML (`8`, `true`, `"text"`, `["a", "b"]`); anything that is not valid
/// TOML is a string, so `--set output.uri=s3://bucket/x` works without quotes.
pub fn apply_override(
    table: &mut toml::Table,
    spec: &str,
    flat: bool,
) -> Result<(), ConfigProblem> {
    let at = format!("--set {spec}");
    let expected = if flat {
        "expected key=value (e.g. batch_size=32)"
    } else {
        "expected section.key=value (e.g. batching.batch_size=32)"
    };
    let Some((path, raw)) = spec.split_once('=') else {
        return Err(problem(at, expected));
    };
    let keys: Vec<&str> = path.trim().split('.').map(str::trim).collect();
    let depth_ok = if flat {
        keys.len() == 1
    } else {
        keys.len() >= 2
    };
    if !depth_ok || keys.iter().any(|k| k.is_empty()) {
        return Err(problem(at, expected));
    }
    let mut node = table;
    for key in &keys[..keys.len() - 1] {
        let entry = node
            .entry(key.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(problem(at, format!("`{key}` is not a section"))),
        };
    }
    node.insert(keys[keys.len() - 1].to_string(), toml_value(raw));
    Ok(())
}

/// A command-line value read as TOML (`8`, `true`, `"text"`, `["a", "b"]`), or as
/// a plain string when it is not valid TOML (`s3://bucket/x`).
pub fn toml_value(raw: &str) -> toml::Value {
    let raw = raw.trim();
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// Checks a section's keys one by one (its name, its table).
pub type SectionCheck = fn(&str, &toml::Table) -> Vec<ConfigProblem>;

/// Runs each `[section]`'s check; an unknown section or a section that is not a
/// table is a problem of its own.
pub fn check_sections(
    table: &toml::Table,
    sections: &[(&str, SectionCheck)],
) -> Vec<ConfigProblem> {
    let names: Vec<&str> = sections.iter().map(|(n, _)| *n).collect();
    let mut problems = Vec::new();
    for (section, value) in table {
        let Some((_, check)) = sections.iter().find(|(n, _)| n == section) else {
            problems.push(problem(
                section.as_str(),
                format!(
                    "unknown section `[{section}]`; expected one of {}",
                    names.join(", ")
                ),
            ));
            continue;
        };
        match value {
            toml::Value::Table(t) => problems.extend(check(section, t)),
            _ => problems.push(problem(
                section.as_str(),
                format!("must be a table (`[{section}]`)"),
            )),
        }
    }
    problems
}

/// Deserialises each key of a table on its own into `T` (whose fields all have
/// defaults): one problem per unknown key or wrong type, named `section.key`.
pub fn check_section<T: DeserializeOwned>(
    section: &str,
    table: &toml::Table,
) -> Vec<ConfigProblem> {
    table
        .iter()
        .filter_map(|(key, value)| {
            let mut one = toml::Table::new();
            one.insert(key.clone(), value.clone());
            toml::Value::Table(one)
                .try_into::<T>()
                .err()
                .map(|e| problem(join_at(section, key), e.message().trim().to_string()))
        })
        .collect()
}

/// Deserialises `value` as one whole record `T` (a table with required keys, or a
/// type that is only right as a whole): one problem at `at` if it does not.
pub fn check_record<T: DeserializeOwned>(at: &str, value: &toml::Value) -> Vec<ConfigProblem> {
    value
        .clone()
        .try_into::<T>()
        .err()
        .map(|e| problem(at, e.message().trim().to_string()))
        .into_iter()
        .collect()
}

/// Deserialises each element of the top-level array of tables `name` (`[[name]]`)
/// as a whole record `T`: one problem per bad element, at `name[i]` (0-based), which
/// the loader sets aside on its own. A value that is not an array is one problem at
/// `name`.
pub fn check_records<T: DeserializeOwned>(name: &str, value: &toml::Value) -> Vec<ConfigProblem> {
    match value {
        toml::Value::Array(items) => items
            .iter()
            .enumerate()
            .flat_map(|(i, item)| check_record::<T>(&format!("{name}[{i}]"), item))
            .collect(),
        _ => vec![problem(
            name,
            format!("must be an array of tables (`[[{name}]]`)"),
        )],
    }
}

/// `section.key`, or `key` for a file without sections.
fn join_at(section: &str, key: &str) -> String {
    if section.is_empty() {
        key.to_string()
    } else {
        format!("{section}.{key}")
    }
}

/// Removes what the problems' `at`s name (`section.key`, `section`, a top-level
/// `key`, or `name[i]`: element `i` of the array of tables `name`) from `table`.
fn set_aside(table: &mut toml::Table, problems: &[ConfigProblem]) {
    let mut elements: BTreeMap<&str, BTreeSet<usize>> = BTreeMap::new();
    for p in problems {
        if let Some((name, i)) = element_at(&p.at) {
            elements.entry(name).or_default().insert(i);
            continue;
        }
        match p.at.split_once('.') {
            Some((section, key)) => {
                if let Some(toml::Value::Table(t)) = table.get_mut(section) {
                    t.remove(key);
                }
            }
            None => {
                table.remove(&p.at);
            }
        }
    }
    // Elements go all at once, so the indices of the others stay as they were named.
    for (name, bad) in elements {
        if let Some(toml::Value::Array(items)) = table.get_mut(name) {
            let mut i = 0;
            items.retain(|_| {
                i += 1;
                !bad.contains(&(i - 1))
            });
        }
    }
}

/// A count that must lie in `range`.
pub fn count_in<T>(
    p: &mut Vec<ConfigProblem>,
    at: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) where
    T: PartialOrd + std::fmt::Display,
{
    if !range.contains(&value) {
        p.push(problem(
            at,
            format!(
                "{value}: must be between {} and {}",
                range.start(),
                range.end()
            ),
        ));
    }
}

/// A number of seconds that must lie in `range` (NaN and infinities never do).
pub fn seconds_in(
    p: &mut Vec<ConfigProblem>,
    at: &str,
    value: f64,
    range: std::ops::RangeInclusive<f64>,
) {
    if !(value.is_finite() && range.contains(&value)) {
        p.push(problem(
            at,
            format!(
                "{value}: must be between {} and {} seconds",
                range.start(),
                range.end()
            ),
        ));
    }
}

/// The variable that names audiocap's own folder.
pub const AUDIOCAP_HOME: &str = "AUDIOCAP_HOME";

/// audiocap's own folder (the ONNX Runtime install, the corpus cache, the record of
/// verified model files): `$AUDIOCAP_HOME` when set and not empty, else
/// `$HOME/.local/share/audiocap`; `None` with neither.
pub fn audiocap_home() -> Option<PathBuf> {
    audiocap_home_from(
        std::env::var_os(AUDIOCAP_HOME),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

/// [`audiocap_home`] from the two variables' values (for callers with their own
/// view of the environment).
pub fn audiocap_home_from(
    audiocap_home: Option<OsString>,
    home: Option<PathBuf>,
) -> Option<PathBuf> {
    match audiocap_home.filter(|v| !v.is_empty()) {
        Some(dir) => Some(PathBuf::from(dir)),
        None => home.map(|h| h.join(".local/share/audiocap")),
    }
}

/// `name[i]` (a top-level array's element) as `(name, i)`.
fn element_at(at: &str) -> Option<(&str, usize)> {
    let (name, index) = at.strip_suffix(']')?.rsplit_once('[')?;
    if name.is_empty() || name.contains('.') {
        return None;
    }
    Some((name, index.parse().ok()?))
}

/// Where a model runs: the one device grammar of every settings file and flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// A CUDA device by index.
    Cuda(usize),
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// A device string that is not `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid device `{given}`: expected `cpu`, `cuda` (CUDA device 0) or `cuda:N` \
     (CUDA device index N, e.g. `cuda:1`)"
)]
pub struct ParseDeviceError {
    /// The string that was given.
    pub given: String,
}

impl FromStr for DeviceSpec {
    type Err = ParseDeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || ParseDeviceError {
            given: s.to_string(),
        };
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => {
                let index = other.strip_prefix("cuda:").ok_or_else(invalid)?;
                // `usize::from_str` accepts a leading `+`; a device index is plain digits.
                if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid());
                }
                index.parse().map(Self::Cuda).map_err(|_| invalid())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, PartialEq, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct File {
        job: Job,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Job {
        size: i64,
        name: String,
    }

    impl Default for Job {
        fn default() -> Self {
            Job {
                size: 1,
                name: "x".into(),
            }
        }
    }

    fn schema() -> Schema<File> {
        Schema {
            check_keys: |t| check_sections(t, &[("job", check_section::<Job>)]),
            validate: |f| {
                if f.job.size < 0 {
                    Err(vec![problem("job.size", "must be zero or more")])
                } else {
                    Ok(())
                }
            },
            flat: false,
        }
    }

    #[test]
    fn a_flat_file_is_checked_key_by_key_and_overridden_by_key() {
        let flat = Schema::<Job> {
            check_keys: |t| check_section::<Job>("", t),
            validate: |_| Ok(()),
            flat: true,
        };
        let job = parse("size = 2\n", "s.toml", &["name=y".into()], &flat).unwrap();
        assert_eq!((job.size, job.name.as_str()), (2, "y"));
        let err = parse(
            "size = \"2\"\nmore = 1\n",
            "s.toml",
            &["a.b=1".into()],
            &flat,
        )
        .unwrap_err();
        let ats: Vec<&str> = err.problems.iter().map(|p| p.at.as_str()).collect();
        assert_eq!(ats, ["--set a.b=1", "more", "size"], "{err}");
    }

    #[test]
    fn every_problem_of_every_step_is_listed_once() {
        let text = "[job]\nsize = -3\nname = 5\ncolour = \"red\"\n[other]\n";
        let err = parse(text, "f.toml", &["job".into()], &schema()).unwrap_err();
        let ats: Vec<&str> = err.problems.iter().map(|p| p.at.as_str()).collect();
        assert_eq!(
            ats,
            ["--set job", "job.colour", "job.name", "other", "job.size"],
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("f.toml: 5 problems\n  - --set job: "),
            "{err}"
        );
    }

    #[test]
    fn each_bad_record_of_an_array_of_tables_is_its_own_problem_and_set_aside() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Item {
            id: String,
        }
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct List {
            #[serde(default)]
            item: Vec<Item>,
        }
        let schema = Schema::<List> {
            check_keys: |t| {
                t.iter()
                    .flat_map(|(k, v)| match k.as_str() {
                        "item" => check_records::<Item>(k, v),
                        _ => vec![problem(k.as_str(), "unknown")],
                    })
                    .collect()
            },
            validate: |_| Ok(()),
            flat: true,
        };
        let text = "[[item]]\nid = \"a\"\n[[item]]\nid = 2\n[[item]]\nid = \"c\"\n\
                    [[item]]\nname = \"d\"\n[[item]]\nid = \"e\"\n";
        let (list, problems) = parse_partial(text, &[], &schema);
        let ats: Vec<&str> = problems.iter().map(|p| p.at.as_str()).collect();
        assert_eq!(ats, ["item[1]", "item[3]"], "{problems:?}");
        assert!(
            problems[1].message.contains("unknown field `name`"),
            "{problems:?}"
        );
        // The good records are still read, the bad ones left out.
        let ids: Vec<String> = list.unwrap().item.into_iter().map(|i| i.id).collect();
        assert_eq!(ids, ["a", "c", "e"]);
        let err = parse("item = 3\n", "l.toml", &[], &schema).unwrap_err();
        assert_eq!(err.problems[0].at, "item", "{err}");
        assert!(err.problems[0].message.contains("array of tables"), "{err}");
        let one = check_record::<Item>("x", &toml_value("{ id = \"a\" }"));
        assert!(one.is_empty(), "{one:?}");
    }

    #[test]
    fn overrides_are_toml_values_or_plain_strings() {
        let f = parse(
            "",
            "f",
            &["job.size=8".into(), "job.name=s3://b/x".into()],
            &schema(),
        )
        .unwrap();
        assert_eq!((f.job.size, f.job.name.as_str()), (8, "s3://b/x"));
        let err = parse(
            "[job]\nsize = 1\n",
            "f",
            &["job.size.x=1".into()],
            &schema(),
        )
        .unwrap_err();
        assert_eq!(err.problems[0].message, "`size` is not a section");
        let err = load(Path::new("/nonexistent/f.toml"), &[], &schema()).unwrap_err();
        assert!(
            err.problems[0].message.starts_with("cannot read the file"),
            "{err}"
        );
        let err = parse("[job", "f", &[], &schema()).unwrap_err();
        assert!(
            err.problems[0].message.starts_with("not valid TOML"),
            "{err}"
        );
    }

    #[test]
    fn audiocaps_folder_is_its_variable_else_under_home() {
        let home = Some(PathBuf::from("/home/u"));
        let at = |v: Option<&str>, h: &Option<PathBuf>| {
            audiocap_home_from(v.map(OsString::from), h.clone())
        };
        assert_eq!(at(Some("/data/ac"), &home), Some(PathBuf::from("/data/ac")));
        assert_eq!(
            at(Some(""), &home),
            Some(PathBuf::from("/home/u/.local/share/audiocap"))
        );
        assert_eq!(
            at(None, &home),
            Some(PathBuf::from("/home/u/.local/share/audiocap"))
        );
        assert_eq!(at(None, &None), None);
    }

    #[test]
    fn devices_have_one_grammar() {
        for (text, device) in [
            ("cpu", DeviceSpec::Cpu),
            ("CPU", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            (" CUDA ", DeviceSpec::Cuda(0)),
            ("cuda:0", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
            ("Cuda:12", DeviceSpec::Cuda(12)),
            (" cuda:12 ", DeviceSpec::Cuda(12)),
        ] {
            assert_eq!(text.parse(), Ok(device), "{text}");
        }
        for s in [DeviceSpec::Cpu, DeviceSpec::Cuda(0), DeviceSpec::Cuda(7)] {
            assert_eq!(s.to_string().parse(), Ok(s));
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn other_devices_are_refused_naming_the_valid_forms() {
        for bad in [
            "",
            "gpu",
            "cuda:",
            "cuda:x",
            "cuda:-1",
            "cuda:+1",
            "cuda0",
            "cuda 1",
            "cuda:1:2",
            "cpu:0",
            "cuda:99999999999999999999999",
        ] {
            let err = bad.parse::<DeviceSpec>().expect_err(bad);
            let msg = err.to_string();
            assert!(msg.contains(&format!("`{bad}`")), "{msg}");
            for form in ["`cpu`", "`cuda`", "`cuda:N`"] {
                assert!(msg.contains(form), "{msg}");
            }
        }
    }
}
