//! A time-compressed copy of the repository's alert rules, for runs that last minutes.
//!
//! The rules in `deploy/prometheus/rules/walrelay.yml` are sized for production: `for:` windows
//! of one to thirty minutes, range windows up to an hour and thresholds such as 1 GiB of
//! retained WAL or 10000 messages of lag. A chaos run of five minutes would never see most of
//! them fire, and a test that waited for them would take hours. [`compress_rules`] therefore
//! reads the repository's file (so every change to the rules reaches the test run; there is no
//! hand-kept copy) and writes a copy in which, for every alerting rule (one with `alert:`):
//!
//! - `for:` (and `keep_firing_for:` where present) is divided by [`Compression::time_factor`];
//! - every range selector `[d]` and subquery `[d:s]` (also `[d:]`) of `expr` is divided the same
//!   way, both the range and the step, and so is the duration after an `offset`;
//! - each `(from, to)` of [`Compression::thresholds`] replaces the number literal `from` in
//!   `expr`, as written and as a whole token (`10000` does not match inside `100000`, `10000.5`,
//!   a metric name or a quoted string). A `from` that no alert's `expr` contains is an error
//!   naming it, so a changed rule file fails loudly instead of silently keeping a production
//!   threshold in the run;
//! - each alert gets the label [`Compression::label`] (e.g. `copy: compressed`), so the copy's
//!   `ALERTS` series and `/api/v1/alerts` entries can be told from the original rule's; an
//!   alert that already has that label name is an error;
//! - each group's name gets the suffix `-` + the label's value (`walrelay-producer-compressed`),
//!   and a group's own `interval:` is divided too, so the copy and the original can be loaded
//!   into one server at once ([`super::Config::extra_rule_files`]).
//!
//! Everything else is kept as it is: recording rules (not compressed, not relabelled: when both
//! files are loaded the same recording is evaluated by both groups with the same result, which
//! matters only once the file has recording rules), annotations, the alerts' other labels, and
//! numbers that mean seconds in an expression (`predict_linear(x[1h], 3600)`, `time() - t >
//! 600`): those are thresholds in this sense and go in [`Compression::thresholds`].
//!
//! Durations are written in whole seconds (`30m` at factor 30 is `60s`, `[15m:1m]` is
//! `[30s:2s]`): the quotient is rounded to the nearest second (half a second up) and at least
//! `1s`; a zero `for:` stays zero. Prometheus cannot be more precise than its intervals, and the
//! caller must choose them small enough for the compressed windows:
//!
//! - the scrape interval at most half the shortest compressed range, so that `increase`,
//!   `rate` and `deriv` see two samples (factor 30: `[10m]` becomes `[20s]`, fine at 2 s);
//! - the evaluation interval at most the shortest compressed `for:` and subquery step: an alert
//!   is pending at the first evaluation where its condition holds and firing at the first one
//!   at least `for` later, so a `for:` shorter than the interval is in effect one interval. At
//!   factor 30 `for: 1m` and the step `:1m` both become `2s`, exactly [`super::Config`]'s
//!   default interval; a larger factor would need a smaller interval.
//!
//! Not compressed, because it is no part of the rules: the server's query lookback of five
//! minutes (`--query.lookback-delta`). A target that stops being scraped ends its series with a
//! staleness marker, so this shows only for series whose samples stop without one.

use std::path::Path;

use anyhow::{Context, anyhow, bail};
use serde_yaml::Value as Yaml;

/// How [`compress_rules`] changes the rules (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compression {
    /// Every duration of an alert is divided by this (at least 1).
    pub time_factor: u32,
    /// Number literals replaced in alert expressions: `(from, to)`, e.g.
    /// `("1073741824", "33554432")`. Each `from` must occur in some alert's `expr`.
    pub thresholds: Vec<(String, String)>,
    /// A label added to every alert, e.g. `("copy", "compressed")`; its value also suffixes the
    /// group names.
    pub label: (String, String),
}

/// The rules file `src` compressed as `c` says: the YAML text of a rules file (see the module
/// doc).
pub fn compress_rules(src: &Path, c: &Compression) -> anyhow::Result<String> {
    if c.time_factor == 0 {
        bail!("time_factor 0: durations are divided by it");
    }
    let (key, value) = &c.label;
    if key.is_empty() || value.is_empty() {
        bail!("the label {key:?}: {value:?} needs a name and a value");
    }
    for (from, to) in &c.thresholds {
        for n in [from, to] {
            if !is_number(n) {
                bail!("threshold {from} -> {to}: {n:?} is not a number literal");
            }
        }
    }
    let text = std::fs::read_to_string(src).with_context(|| format!("read {}", src.display()))?;
    let mut doc: Yaml =
        serde_yaml::from_str(&text).with_context(|| format!("parse {}", src.display()))?;
    let groups = doc
        .get_mut("groups")
        .and_then(Yaml::as_sequence_mut)
        .ok_or_else(|| anyhow!("{}: no `groups` list", src.display()))?;
    let mut used = vec![false; c.thresholds.len()];
    for group in groups.iter_mut() {
        let group = group
            .as_mapping_mut()
            .ok_or_else(|| anyhow!("{}: a group is not a mapping", src.display()))?;
        let name = group
            .get("name")
            .and_then(Yaml::as_str)
            .ok_or_else(|| anyhow!("{}: a group without a name", src.display()))?
            .to_string();
        group.insert("name".into(), Yaml::from(format!("{name}-{value}")));
        if let Some(interval) = group.get_mut("interval") {
            *interval = compress_yaml_duration(interval, c.time_factor)
                .with_context(|| format!("{}: group {name}: `interval`", src.display()))?;
        }
        let Some(rules) = group.get_mut("rules").and_then(Yaml::as_sequence_mut) else {
            continue;
        };
        for rule in rules.iter_mut().filter_map(Yaml::as_mapping_mut) {
            let Some(alert) = rule.get("alert").and_then(Yaml::as_str).map(str::to_string) else {
                continue;
            };
            let context = || format!("{}: group {name}, alert {alert}", src.display());
            for field in ["for", "keep_firing_for"] {
                if let Some(d) = rule.get_mut(field) {
                    *d = compress_yaml_duration(d, c.time_factor)
                        .with_context(|| format!("{}: `{field}`", context()))?;
                }
            }
            let expr = rule
                .get("expr")
                .and_then(Yaml::as_str)
                .ok_or_else(|| anyhow!("{}: no `expr` string", context()))?;
            let expr = rewrite_expr(expr, c.time_factor, &c.thresholds, &mut used)
                .with_context(context)?;
            rule.insert("expr".into(), Yaml::from(expr));
            let labels = rule
                .entry("labels".into())
                .or_insert_with(|| Yaml::Mapping(Default::default()));
            let labels = labels
                .as_mapping_mut()
                .ok_or_else(|| anyhow!("{}: `labels` is not a mapping", context()))?;
            if labels.contains_key(key.as_str()) {
                bail!("{}: already has the label {key}", context());
            }
            labels.insert(key.as_str().into(), value.as_str().into());
        }
    }
    let unused: Vec<&str> = c
        .thresholds
        .iter()
        .zip(&used)
        .filter(|(_, used)| !**used)
        .map(|((from, _), _)| from.as_str())
        .collect();
    if !unused.is_empty() {
        bail!(
            "{}: no alert expression contains the threshold {} (has the rule changed?)",
            src.display(),
            unused.join(", ")
        );
    }
    let body = serde_yaml::to_string(&doc).context("write the compressed rules")?;
    let thresholds: Vec<String> = c
        .thresholds
        .iter()
        .map(|(from, to)| format!("{from} -> {to}"))
        .collect();
    Ok(format!(
        "# Generated from {} by walrelay_tests::prometheus::compress_rules: durations / {}, \
         thresholds [{}], label {key}: {value}. Do not edit.\n{body}",
        src.display(),
        c.time_factor,
        thresholds.join(", ")
    ))
}

/// A Prometheus duration (`1h30m`, `90s`, `500ms`, `0`) in milliseconds.
fn parse_duration(s: &str) -> Option<u64> {
    match s {
        "0" => return Some(0),
        "" => return None,
        _ => {}
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let ms = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 7 * 86_400_000,
            "y" => 365 * 86_400_000,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(ms)?)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// `s` divided by `factor`, in whole seconds: rounded to the nearest, at least 1 s unless zero.
fn compress_duration(s: &str, factor: u32) -> anyhow::Result<String> {
    let ms = parse_duration(s).ok_or_else(|| anyhow!("{s:?} is not a Prometheus duration"))?;
    if ms == 0 {
        return Ok("0s".into());
    }
    let divisor = u64::from(factor) * 1000;
    let secs = (ms + divisor / 2) / divisor;
    Ok(format!("{}s", secs.max(1)))
}

fn compress_yaml_duration(v: &Yaml, factor: u32) -> anyhow::Result<Yaml> {
    let s = match v {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        other => bail!("{other:?} is not a duration"),
    };
    Ok(Yaml::from(compress_duration(&s, factor)?))
}

/// Whether `s` is a PromQL number literal of the kind a threshold is written as.
fn is_number(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit() || c == '.')
        && (s.parse::<f64>().is_ok()
            || s.strip_prefix("0x")
                .or_else(|| s.strip_prefix("0X"))
                .is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit())))
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// `expr` with its range selectors, subqueries and offsets divided by `factor` and its number
/// literals replaced per `thresholds` (marking each one found in `used`). Quoted strings and
/// comments are copied unchanged.
fn rewrite_expr(
    expr: &str,
    factor: u32,
    thresholds: &[(String, String)],
    used: &mut [bool],
) -> anyhow::Result<String> {
    let mut out = String::with_capacity(expr.len());
    let mut i = 0;
    while let Some(c) = expr[i..].chars().next() {
        let rest = &expr[i..];
        let len = match c {
            '"' | '\'' | '`' => {
                let mut escaped = false;
                let end = rest
                    .char_indices()
                    .skip(1)
                    .find(|&(_, ch)| {
                        if escaped {
                            escaped = false;
                            return false;
                        }
                        if ch == '\\' && c != '`' {
                            escaped = true;
                            return false;
                        }
                        ch == c
                    })
                    .map(|(j, _)| j + 1)
                    .ok_or_else(|| anyhow!("unterminated string in {expr:?}"))?;
                out.push_str(&rest[..end]);
                end
            }
            '#' => {
                let end = rest.find('\n').unwrap_or(rest.len());
                out.push_str(&rest[..end]);
                end
            }
            '[' => {
                let close = rest
                    .find(']')
                    .ok_or_else(|| anyhow!("unclosed `[` in {expr:?}"))?;
                let inner = &rest[1..close];
                let bad = || anyhow!("`[{inner}]` is neither a range nor a subquery");
                out.push('[');
                match inner.split_once(':') {
                    None => {
                        out.push_str(&compress_duration(inner.trim(), factor).map_err(|_| bad())?)
                    }
                    Some((range, step)) => {
                        out.push_str(&compress_duration(range.trim(), factor).map_err(|_| bad())?);
                        out.push(':');
                        if !step.trim().is_empty() {
                            out.push_str(
                                &compress_duration(step.trim(), factor).map_err(|_| bad())?,
                            );
                        }
                    }
                }
                out.push(']');
                close + 1
            }
            c if is_ident_start(c) => {
                let end = rest
                    .find(|ch: char| !is_ident_char(ch))
                    .unwrap_or(rest.len());
                let word = &rest[..end];
                out.push_str(word);
                if word != "offset" {
                    end
                } else {
                    // `offset 5m`, `offset -5m`: the duration is compressed too.
                    let after = &rest[end..];
                    let space = after.len() - after.trim_start().len();
                    let sign = usize::from(after[space..].starts_with('-'));
                    let start = space + sign;
                    let d_len = after[start..]
                        .find(|ch: char| !ch.is_ascii_alphanumeric())
                        .unwrap_or(after.len() - start);
                    let d = &after[start..start + d_len];
                    match compress_duration(d, factor) {
                        Ok(new) if d_len > 0 => {
                            out.push_str(&after[..start]);
                            out.push_str(&new);
                            end + start + d_len
                        }
                        // `offset` as a label name, say `by (offset)`.
                        _ => end,
                    }
                }
            }
            c if c.is_ascii_digit()
                || (c == '.' && rest[1..].starts_with(|ch: char| ch.is_ascii_digit())) =>
            {
                let hex = rest.starts_with("0x") || rest.starts_with("0X");
                let bytes = rest.as_bytes();
                // The first byte is a digit or a dot: `end - 1` is never looked at for it.
                let in_number = |end: usize| {
                    let b = bytes[end];
                    b.is_ascii_alphanumeric()
                        || b == b'.'
                        || b == b'_'
                        // The sign of an exponent, `1e+9`.
                        || ((b == b'+' || b == b'-')
                            && !hex
                            && matches!(bytes[end - 1], b'e' | b'E')
                            && bytes.get(end + 1).is_some_and(u8::is_ascii_digit))
                };
                let mut end = 0;
                while end < bytes.len() && in_number(end) {
                    end += 1;
                }
                let token = &rest[..end];
                match thresholds.iter().position(|(from, _)| from == token) {
                    Some(k) => {
                        used[k] = true;
                        out.push_str(&thresholds[k].1);
                    }
                    None => out.push_str(token),
                }
                end
            }
            c => {
                out.push(c);
                c.len_utf8()
            }
        };
        i += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::process::Command;
    use std::time::Duration;

    use super::super::{Config, Prometheus, bin_dir, repo_root};
    use super::*;

    fn repo_rules() -> std::path::PathBuf {
        repo_root().join("deploy/prometheus/rules/walrelay.yml")
    }

    fn chaos() -> Compression {
        Compression {
            time_factor: 30,
            thresholds: vec![
                ("1073741824".into(), "33554432".into()),
                ("10000".into(), "300".into()),
            ],
            label: ("copy".into(), "compressed".into()),
        }
    }

    /// Alert name -> (group, rule) of a rules file's text.
    fn alerts(text: &str) -> BTreeMap<String, (String, Yaml)> {
        let doc: Yaml = serde_yaml::from_str(text).expect("rules YAML");
        let mut out = BTreeMap::new();
        for g in doc["groups"].as_sequence().expect("groups") {
            let group = g["name"].as_str().expect("group name").to_string();
            for r in g["rules"].as_sequence().expect("rules") {
                if let Some(a) = r["alert"].as_str() {
                    out.insert(a.to_string(), (group.clone(), r.clone()));
                }
            }
        }
        out
    }

    fn expr(rules: &BTreeMap<String, (String, Yaml)>, alert: &str) -> String {
        rules[alert].1["expr"].as_str().expect("expr").to_string()
    }

    #[test]
    fn durations_in_whole_seconds() {
        assert_eq!(parse_duration("1h30m"), Some(5_400_000));
        assert_eq!(parse_duration("500ms"), Some(500));
        assert_eq!(parse_duration("5x"), None);
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(compress_duration("30m", 30).expect("30m"), "60s");
        assert_eq!(compress_duration("1h", 30).expect("1h"), "120s");
        // 60 s / 7 = 8.57 s: the nearest second; 45 s / 30 = 1.5 s: half a second up.
        assert_eq!(compress_duration("1m", 7).expect("1m"), "9s");
        assert_eq!(compress_duration("45s", 30).expect("45s"), "2s");
        // Never below a second, zero stays zero.
        assert_eq!(compress_duration("10s", 30).expect("10s"), "1s");
        assert_eq!(compress_duration("0s", 30).expect("0s"), "0s");
    }

    #[test]
    fn expressions_keep_strings_and_other_numbers() {
        let thresholds = [
            ("10000".to_string(), "300".to_string()),
            ("1e9".to_string(), "5".to_string()),
            // Not the exponent of `2e+3`.
            ("3".to_string(), "4".to_string()),
        ];
        let mut used = [false; 3];
        let e = r#"rate(x_10000{a="[1h] 10000"}[5m] offset -1h) > 10000 or y > 100000 or z > 10000.5 or w > 1e9 or u > 2e+3 or v[1h:] # 10000 [2h]"#;
        let out = rewrite_expr(e, 30, &thresholds, &mut used).expect("rewrite");
        assert_eq!(
            out,
            r#"rate(x_10000{a="[1h] 10000"}[10s] offset -120s) > 300 or y > 100000 or z > 10000.5 or w > 5 or u > 2e+3 or v[120s:] # 10000 [2h]"#
        );
        assert_eq!(used, [true, true, false]);
        let err = rewrite_expr("x[abc]", 30, &[], &mut []).expect_err("not a range");
        assert!(err.to_string().contains("[abc]"), "{err}");
    }

    #[test]
    fn compresses_the_repository_rules() {
        let text = compress_rules(&repo_rules(), &chaos()).expect("compress");
        let original = std::fs::read_to_string(repo_rules()).expect("read rules");
        let (before, after) = (alerts(&original), alerts(&text));
        assert_eq!(
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>()
        );

        let wal = &after["WalrelaySlotRetainedWalGrowing"];
        assert_eq!(wal.0, "walrelay-producer-compressed");
        assert_eq!(wal.1["for"], Yaml::from("60s"));
        let wal_expr = expr(&after, "WalrelaySlotRetainedWalGrowing");
        assert!(wal_expr.contains("> 33554432\n"), "{wal_expr}");
        assert!(wal_expr.contains("[60s]"), "{wal_expr}");
        assert!(!wal_expr.contains("1073741824"), "{wal_expr}");
        // 2 GiB is no threshold of this compression: kept.
        assert!(expr(&after, "WalrelaySlotNearWalLimit").contains("< 2147483648"));

        let lag = &after["WalrelayConsumerLagGrowing"];
        assert_eq!(lag.0, "walrelay-consumers-compressed");
        assert_eq!(lag.1["for"], Yaml::from("30s"));
        let lag_expr = expr(&after, "WalrelayConsumerLagGrowing");
        assert!(lag_expr.contains("[30s:2s]"), "{lag_expr}");
        assert!(lag_expr.contains("> 300\n"), "{lag_expr}");
        assert!(!lag_expr.contains("10000"), "{lag_expr}");

        assert!(expr(&after, "WalrelayWebhookSubscriptionDisabled").contains("[120s]"));
        assert!(expr(&after, "WalrelayProducerErrors").contains("[20s]"));
        assert_eq!(after["WalrelayKafkaUnreachable"].1["for"], Yaml::from("2s"));
        // No `for:` stays none.
        assert!(after["WalrelayDeadLetters"].1.get("for").is_none());

        for (name, (_, rule)) in &after {
            let old = &before[name].1;
            assert_eq!(rule["labels"]["copy"], Yaml::from("compressed"), "{name}");
            assert_eq!(
                rule["labels"]["severity"], old["labels"]["severity"],
                "{name}"
            );
            assert_eq!(rule["annotations"], old["annotations"], "{name}");
            // Every range and step in whole seconds.
            let e = rule["expr"].as_str().expect("expr");
            for window in e.split('[').skip(1).filter_map(|w| w.split_once(']')) {
                for d in window.0.split(':').filter(|d| !d.is_empty()) {
                    assert!(
                        d.ends_with('s') && d[..d.len() - 1].parse::<u64>().is_ok(),
                        "{name}: {e}"
                    );
                }
            }
            if let Some(f) = old["for"].as_str() {
                let ms = parse_duration(f).expect("for");
                assert_eq!(
                    rule["for"],
                    Yaml::from(format!("{}s", (ms / 30_000).max(1))),
                    "{name}"
                );
            }
        }
        assert!(text.starts_with("# Generated from "), "{text}");
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        let mut c = chaos();
        c.thresholds.push(("123456789".into(), "5".into()));
        let err = compress_rules(&repo_rules(), &c).expect_err("an unknown threshold");
        assert!(err.to_string().contains("123456789"), "{err}");
        assert!(!err.to_string().contains("10000"), "{err}");

        let mut c = chaos();
        c.thresholds = vec![("lots".into(), "5".into())];
        assert!(compress_rules(&repo_rules(), &c).is_err());
        let mut c = chaos();
        c.time_factor = 0;
        assert!(compress_rules(&repo_rules(), &c).is_err());
        let mut c = chaos();
        c.label = ("severity".into(), "compressed".into());
        let err = compress_rules(&repo_rules(), &c).expect_err("a label the rules have");
        assert!(err.to_string().contains("severity"), "{err}");
    }

    /// Runs `promtool` with `args`; its output, or an error with it.
    fn promtool(args: &[&std::ffi::OsStr]) -> anyhow::Result<String> {
        let out = Command::new(bin_dir()?.join("promtool"))
            .args(args)
            .output()
            .context("run promtool")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("promtool {args:?}: {}\n{text}", out.status);
        }
        Ok(text)
    }

    #[test]
    fn promtool_accepts_the_copy_and_it_fires_in_compressed_time() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("compressed.yml");
        std::fs::write(
            &file,
            compress_rules(&repo_rules(), &chaos()).expect("compress"),
        )
        .expect("write");
        let out = promtool(&["check".as_ref(), "rules".as_ref(), file.as_os_str()])
            .expect("promtool check rules");
        assert!(out.contains("SUCCESS: 10 rules found"), "{out}");

        // The two alerts with a compressed threshold and range, on series sampled every 2 s:
        // lag grows 10 a step (above 300 from 62 s; subquery over [30s:2s]; for: 30s) and WAL
        // 1 MiB a step (above 32 MiB from 66 s; deriv over [60s]; for: 60s). The production
        // rules would not fire for hours.
        let unit = dir.path().join("test.yml");
        std::fs::write(
            &unit,
            r#"rule_files: [compressed.yml]
evaluation_interval: 2s
tests:
  - interval: 2s
    input_series:
      - series: 'walrelay_consumer_lag_messages{job="walrelay-consumer",component="indexer",partition="0"}'
        values: '0+10x200'
      - series: 'walrelay_producer_slot_retained_wal_bytes{job="walrelay-producer",instance="p"}'
        values: '0+1048576x200'
    promql_expr_test:
      - expr: count by (alertname, alertstate, copy) (ALERTS)
        eval_time: 60s
        exp_samples: []
      - expr: count by (alertname, alertstate, copy) (ALERTS)
        eval_time: 80s
        exp_samples:
          - labels: '{alertname="WalrelayConsumerLagGrowing",alertstate="pending",copy="compressed"}'
            value: 1
          - labels: '{alertname="WalrelaySlotRetainedWalGrowing",alertstate="pending",copy="compressed"}'
            value: 1
      - expr: count by (alertname, alertstate, copy) (ALERTS)
        eval_time: 110s
        exp_samples:
          - labels: '{alertname="WalrelayConsumerLagGrowing",alertstate="firing",copy="compressed"}'
            value: 1
          - labels: '{alertname="WalrelaySlotRetainedWalGrowing",alertstate="pending",copy="compressed"}'
            value: 1
      - expr: count by (alertname, alertstate, copy) (ALERTS)
        eval_time: 140s
        exp_samples:
          - labels: '{alertname="WalrelayConsumerLagGrowing",alertstate="firing",copy="compressed"}'
            value: 1
          - labels: '{alertname="WalrelaySlotRetainedWalGrowing",alertstate="firing",copy="compressed"}'
            value: 1
"#,
        )
        .expect("write the unit test");
        let out = promtool(&["test".as_ref(), "rules".as_ref(), unit.as_os_str()])
            .expect("promtool test rules");
        assert!(out.contains("SUCCESS"), "{out}");
    }

    #[tokio::test]
    async fn prometheus_loads_the_copy_next_to_the_original() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("walrelay-compressed.yml");
        std::fs::write(
            &file,
            compress_rules(&repo_rules(), &chaos()).expect("compress"),
        )
        .expect("write");
        // A producer target where nothing listens: `up` is 0, WalrelayProducerNotReady holds.
        let nobody: std::net::SocketAddr = format!("127.0.0.1:{}", crate::free_port())
            .parse()
            .expect("addr");
        let p = Prometheus::start_with(Config {
            targets: vec![("producer".into(), nobody)],
            extra_rule_files: vec![file],
            ..Config::default()
        })
        .await
        .expect("start Prometheus");

        let groups = p.rules().await.expect("rules");
        let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        for g in [
            "walrelay-producer",
            "walrelay-consumers",
            "walrelay-producer-compressed",
            "walrelay-consumers-compressed",
        ] {
            assert!(names.contains(&g), "{g} not in {names:?}");
        }
        let find = |group: &str, alert: &str| {
            groups
                .iter()
                .filter(|g| g.name == group)
                .flat_map(|g| &g.rules)
                .find(|r| r.name == alert)
                .cloned()
                .unwrap_or_else(|| panic!("no {alert} in {group}"))
        };
        let original = find("walrelay-producer", "WalrelaySlotRetainedWalGrowing");
        let copy = find(
            "walrelay-producer-compressed",
            "WalrelaySlotRetainedWalGrowing",
        );
        assert_eq!(original.duration, Duration::from_secs(1800));
        assert_eq!(copy.duration, Duration::from_secs(60));
        // Prometheus prints numbers as Go's %g does.
        assert!(
            original.query.contains("> 1.073741824e+09"),
            "{}",
            original.query
        );
        assert!(copy.query.contains("> 3.3554432e+07"), "{}", copy.query);
        assert!(copy.query.contains("[1m]"), "{}", copy.query);
        assert_eq!(
            copy.labels.get("copy").map(String::as_str),
            Some("compressed")
        );
        assert!(!original.labels.contains_key("copy"));
        let lag = find(
            "walrelay-consumers-compressed",
            "WalrelayConsumerLagGrowing",
        );
        assert_eq!(lag.duration, Duration::from_secs(30));
        // Prometheus prints the parsed expression: 30 s and 2 s stay as they are.
        assert!(lag.query.contains("[30s:2s]"), "{}", lag.query);
        for g in groups.iter().filter(|g| g.name.ends_with("-compressed")) {
            let base = g.name.trim_end_matches("-compressed");
            for r in &g.rules {
                assert_eq!(r.kind, "alerting");
                let o = find(base, &r.name);
                // The repository's windows are all multiples of 30 s.
                assert_eq!(r.duration * 30, o.duration, "{}", r.name);
                if o.query.contains('[') {
                    assert_ne!(r.query, o.query, "{}", r.name);
                }
            }
        }

        // The copy's `for: 10s` fires while the original's `for: 5m` is still pending; the
        // label tells them apart.
        let fired = p
            .wait_alert(
                "WalrelayProducerNotReady",
                super::super::AlertState::Firing,
                Duration::from_secs(60),
            )
            .await
            .expect("the compressed alert fires");
        assert_eq!(
            fired.labels.get("copy").map(String::as_str),
            Some("compressed")
        );
        let now = p.alerts().await.expect("alerts");
        assert!(
            now.iter().any(|a| a.name == "WalrelayProducerNotReady"
                && a.state == super::super::AlertState::Pending
                && !a.labels.contains_key("copy")),
            "{now:?}"
        );
        let healthy = p.rules().await.expect("rules");
        for r in healthy.iter().flat_map(|g| &g.rules) {
            assert_eq!(r.health, "ok", "{} {}: {}", r.name, r.query, r.last_error);
        }
    }
}
