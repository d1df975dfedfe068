//! `edit-config`: change the dynamic configuration in `$EDITOR`, with `-s`/`-p` pairs, or from
//! a YAML file; show a unified diff, confirm, and write with compare-and-set on the revision.

use std::io::Read;
use std::process::Command;

use anyhow::{Context, bail};
use pgvigil_dcs::Dcs;
use pgvigil_rest::operator::patch_config;
use serde_json::{Map, Value};

use super::{Ctx, confirm, read};
use crate::yaml::to_yaml;

#[derive(clap::Args, Clone, Debug)]
pub struct EditConfigArgs {
    /// Cluster name (default: the configured scope).
    pub cluster: Option<String>,
    /// Do not show changes.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Set a configuration value (dotted path = YAML value). Can be given several times.
    #[arg(short = 's', long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Set a PostgreSQL parameter (shorthand for -s postgresql.parameters.NAME=VALUE).
    #[arg(short = 'p', long = "pg", value_name = "NAME=VALUE")]
    pub pg: Vec<String>,
    /// Apply configuration from a YAML file (merged). Use - for stdin.
    #[arg(long = "apply", value_name = "FILE")]
    pub apply: Option<String>,
    /// Replace the configuration with a YAML file. Use - for stdin.
    #[arg(long = "replace", value_name = "FILE")]
    pub replace: Option<String>,
    /// Apply without asking for confirmation.
    #[arg(long)]
    pub force: bool,
}

/// Parses YAML the way PyYAML's `safe_load` reads it (YAML 1.1 booleans, `0755` stays text).
pub fn parse_yaml(text: &str) -> anyhow::Result<Value> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    let options = serde_saphyr::options! {
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::LastWins,
        leading_zero_numbers_as_strings: true,
        non_finite_float_policy: serde_saphyr::NonFiniteFloatPolicy::AsString,
        with_snippet: false,
    };
    serde_saphyr::from_str_with_options::<Value>(text, options).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Sets `path` (dotted; below `postgresql.parameters` the rest is one GUC name, dots included)
/// to `value`; `null` removes the key, and emptied parents disappear.
fn set_path(config: &mut Map<String, Value>, path: &[&str], value: &Value, prefix: &[&str]) {
    let joined;
    let path: Vec<&str> = if prefix == ["postgresql", "parameters"] {
        joined = path.join(".");
        vec![joined.as_str()]
    } else {
        path.to_vec()
    };
    let key = path[0];
    if path.len() == 1 {
        if value.is_null() {
            config.remove(key);
        } else {
            config.insert(key.to_string(), value.clone());
        }
        return;
    }
    if !config.get(key).is_some_and(Value::is_object) {
        config.insert(key.to_string(), Value::Object(Map::new()));
    }
    let mut next_prefix = prefix.to_vec();
    next_prefix.push(key);
    if let Some(Value::Object(child)) = config.get_mut(key) {
        set_path(child, &path[1..], value, &next_prefix);
        if child.is_empty() {
            config.remove(key);
        }
    }
}

/// patronictl's `apply_config_changes`: `key.path=yaml value` pairs.
pub fn apply_pairs(config: &Value, pairs: &[String]) -> anyhow::Result<Value> {
    let mut changed = config.as_object().cloned().unwrap_or_default();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("Invalid parameter setting {pair}");
        };
        let value = parse_yaml(value).with_context(|| format!("{pair}: the value is not valid YAML"))?;
        let path: Vec<&str> = key.trim().split('.').collect();
        if path.iter().any(|p| p.is_empty()) {
            bail!("Invalid parameter setting {pair}");
        }
        set_path(&mut changed, &path, &value, &[]);
    }
    Ok(Value::Object(changed))
}

/// patronictl's `apply_yaml_file`: the file's mapping merged over `config` (null deletes).
pub fn apply_yaml(config: &Value, text: &str, origin: &str) -> anyhow::Result<Value> {
    let new = parse_yaml(text).with_context(|| format!("{origin}: not valid YAML"))?;
    let mut changed = config.as_object().cloned().unwrap_or_default();
    match new {
        Value::Object(patch) => {
            patch_config(&mut changed, &patch);
        }
        Value::Null => {}
        _ => bail!("{origin}: the configuration must be a YAML mapping"),
    }
    Ok(Value::Object(changed))
}

fn read_source(name: &str) -> anyhow::Result<String> {
    if name == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        Ok(text)
    } else {
        std::fs::read_to_string(name).with_context(|| format!("cannot read {name}"))
    }
}

/// Runs `$EDITOR` (else `editor`, else `vi`) on the YAML; returns the edited text.
fn invoke_editor(before: &str, scope: &str) -> anyhow::Result<String> {
    let editor = match std::env::var("EDITOR").ok().filter(|e| !e.trim().is_empty()) {
        Some(e) => e,
        None => ["editor", "vi"]
            .iter()
            .find(|e| which(e))
            .map(|e| e.to_string())
            .context("EDITOR environment variable is not set. editor or vi are not available")?,
    };
    let file = tempfile::Builder::new()
        .prefix(&format!("{}-config-", scope.replace('/', "_")))
        .suffix(".yaml")
        .tempfile()?;
    std::fs::write(file.path(), before)?;
    // Through the shell so that EDITOR may carry options (`code -w`).
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(file.path())
        .status()
        .with_context(|| format!("cannot run the editor {editor}"))?;
    if !status.success() {
        bail!(
            "Editor exited with return code {}",
            status.code().map_or("(killed)".to_string(), |c| c.to_string())
        );
    }
    Ok(std::fs::read_to_string(file.path())?)
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

pub async fn run(ctx: &Ctx, args: EditConfigArgs) -> anyhow::Result<()> {
    let scope = ctx.scope(args.cluster.as_deref())?;
    let dcs = ctx.dcs(&scope).await?;
    let view = read(&dcs).await?;
    let Some(config) = view.config.clone() else {
        bail!("The config key does not exist in the cluster {scope}");
    };
    let before = to_yaml(&config.value);
    let mut after: Option<String> = None;
    let mut changed = config.value.clone();
    if let Some(file) = &args.replace {
        changed = apply_yaml(&Value::Object(Map::new()), &read_source(file)?, file)?;
        after = Some(to_yaml(&changed));
    }
    if let Some(file) = &args.apply {
        changed = apply_yaml(&changed, &read_source(file)?, file)?;
        after = Some(to_yaml(&changed));
    }
    if !args.set.is_empty() || !args.pg.is_empty() {
        let mut pairs = args.set.clone();
        pairs.extend(
            args.pg
                .iter()
                .map(|p| format!("postgresql.parameters.{}", p.trim_start())),
        );
        changed = apply_pairs(&changed, &pairs)?;
        after = Some(to_yaml(&changed));
    }
    let after = match after {
        Some(a) => a,
        None => {
            let edited = invoke_editor(&before, &scope)?;
            changed = match parse_yaml(&edited).context("the edited configuration is not valid YAML")? {
                Value::Null => Value::Object(Map::new()),
                v @ Value::Object(_) => v,
                _ => bail!("the edited configuration must be a YAML mapping"),
            };
            edited
        }
    };
    if changed == config.value {
        if !args.quiet {
            println!("Not changed");
        }
        return Ok(());
    }
    if !args.quiet {
        for line in unified_diff(&before, &after) {
            println!("{line}");
        }
    }
    if (args.apply.as_deref() == Some("-") || args.replace.as_deref() == Some("-")) && !args.force {
        println!("Use --force option to apply changes");
        return Ok(());
    }
    if args.force || confirm("Apply these changes?")? {
        if !dcs.set_config(&changed, Some(config.mod_revision)).await? {
            bail!("Config modification aborted due to concurrent changes");
        }
        println!("Configuration changed");
    } else {
        println!("Configuration not changed");
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Equal,
    Delete,
    Insert,
}

/// A unified diff with three lines of context, formatted like Python's `difflib.unified_diff`.
pub fn unified_diff(before: &str, after: &str) -> Vec<String> {
    let split =
        |s: &str| -> Vec<String> { s.trim_end_matches('\n').split('\n').map(str::to_string).collect() };
    let (a, b) = (split(before), split(after));
    if a == b {
        return Vec::new();
    }
    // Longest common subsequence table (configurations are small).
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    // (op, index in a, index in b)
    let mut ops: Vec<(Op, usize, usize)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            ops.push((Op::Equal, i, j));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            ops.push((Op::Delete, i, j));
            i += 1;
        } else {
            ops.push((Op::Insert, i, j));
            j += 1;
        }
    }
    const CONTEXT: usize = 3;
    let changed: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, (op, _, _))| *op != Op::Equal)
        .map(|(k, _)| k)
        .collect();
    let mut hunks: Vec<(usize, usize)> = Vec::new();
    for &k in &changed {
        let start = k.saturating_sub(CONTEXT);
        let end = (k + CONTEXT + 1).min(ops.len());
        match hunks.last_mut() {
            Some((_, e)) if start <= *e => *e = end.max(*e),
            _ => hunks.push((start, end)),
        }
    }
    let range = |start: usize, len: usize| -> String {
        match len {
            1 => format!("{}", start + 1),
            0 => format!("{start},0"),
            _ => format!("{},{len}", start + 1),
        }
    };
    let mut out = vec!["--- ".to_string(), "+++ ".to_string()];
    for (start, end) in hunks {
        let slice = &ops[start..end];
        let a_start = slice[0].1;
        let b_start = slice[0].2;
        let a_len = slice.iter().filter(|(op, _, _)| *op != Op::Insert).count();
        let b_len = slice.iter().filter(|(op, _, _)| *op != Op::Delete).count();
        out.push(format!(
            "@@ -{} +{} @@",
            range(a_start, a_len),
            range(b_start, b_len)
        ));
        for (op, i, j) in slice {
            out.push(match op {
                Op::Equal => format!(" {}", a[*i]),
                Op::Delete => format!("-{}", a[*i]),
                Op::Insert => format!("+{}", b[*j]),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pairs() {
        let config =
            json!({"ttl": 30, "postgresql": {"parameters": {"max_connections": 100}, "use_slots": true}});
        let changed = apply_pairs(
            &config,
            &[
                "ttl=40".into(),
                "pause=on".into(),
                "postgresql.parameters.auto_explain.log_min_duration=1s".into(),
                "postgresql.parameters.max_connections=null".into(),
                "synchronous_mode='on'".into(),
                "a.b.c=[1, 2]".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            changed,
            json!({"ttl": 40, "pause": true, "synchronous_mode": "on", "a": {"b": {"c": [1, 2]}},
                   "postgresql": {"parameters": {"auto_explain.log_min_duration": "1s"}, "use_slots": true}})
        );
        // Removing the last key of a section removes the section.
        let c = apply_pairs(&json!({"x": {"y": 1}}), &["x.y=null".into()]).unwrap();
        assert_eq!(c, json!({}));
        assert_eq!(
            apply_pairs(&config, &["novalue".into()]).unwrap_err().to_string(),
            "Invalid parameter setting novalue"
        );
        assert!(apply_pairs(&config, &["a..b=1".into()]).is_err());
    }

    #[test]
    fn yaml_files() {
        let config = json!({"ttl": 30, "loop_wait": 10, "postgresql": {"parameters": {"a": 1}}});
        let merged = apply_yaml(
            &config,
            "loop_wait: null\npostgresql:\n  parameters:\n    b: 0755\n",
            "f",
        )
        .unwrap();
        assert_eq!(
            merged,
            json!({"ttl": 30, "postgresql": {"parameters": {"a": 1, "b": "0755"}}})
        );
        assert_eq!(apply_yaml(&config, "", "f").unwrap(), config);
        assert!(apply_yaml(&config, "- 1\n", "f").is_err());
        assert!(apply_yaml(&config, "a: [", "f").is_err());
        let replaced = apply_yaml(&json!({}), "ttl: 60\n", "f").unwrap();
        assert_eq!(replaced, json!({"ttl": 60}));
    }

    #[test]
    fn diff_like_difflib() {
        let before = "a: 1\nb: 2\nc: 3\nd: 4\ne: 5\nf: 6\ng: 7\nh: 8\ni: 9\nj: 10\n";
        let after = "a: 1\nb: 2\nc: 30\nd: 4\ne: 5\nf: 6\ng: 7\nh: 8\ni: 9\nj: 10\nk: 11\n";
        assert_eq!(
            unified_diff(before, after),
            [
                "--- ",
                "+++ ",
                "@@ -1,6 +1,6 @@",
                " a: 1",
                " b: 2",
                "-c: 3",
                "+c: 30",
                " d: 4",
                " e: 5",
                " f: 6",
                "@@ -8,3 +8,4 @@",
                " h: 8",
                " i: 9",
                " j: 10",
                "+k: 11",
            ]
        );
        assert!(unified_diff("x\n", "x\n").is_empty());
        assert_eq!(
            unified_diff("", "a: 1\n"),
            ["--- ", "+++ ", "@@ -1 +1 @@", "-", "+a: 1"]
        );
    }
}
