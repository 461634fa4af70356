//! The repository's scrape config rewritten for a test: targets, intervals and rule paths only
//! (and rules files a test adds).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_yaml::Value as Yaml;

use super::repo_root;

/// What to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Scrape config whose targets are rewritten: `deploy/prometheus/prometheus.yml`.
    pub base: PathBuf,
    /// For a static target `host:port` of the base config: the loopback addresses that replace
    /// it. A host may be given more than once.
    pub targets: Vec<(String, SocketAddr)>,
    /// Targets the base config has no host for (say a `replicate` consumer): one more static
    /// target group in an existing job, with these labels.
    pub extra: Vec<ExtraTarget>,
    /// Scrape and rule evaluation interval.
    pub interval: Duration,
    /// Rules files loaded after the base config's own (made absolute against the current
    /// folder if relative), e.g. a time-compressed copy of the rules
    /// ([`super::compress_rules`]). Not inside the base config's rules folder: its glob loads
    /// those already.
    pub extra_rule_files: Vec<PathBuf>,
}

/// A target added to a job of the base config ([`Config::extra`]).
#[derive(Debug, Clone)]
pub struct ExtraTarget {
    /// An existing `job_name`, e.g. `walrelay-consumer`.
    pub job: String,
    pub addr: SocketAddr,
    /// Target labels, e.g. `component`.
    pub labels: BTreeMap<String, String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            base: repo_root().join("deploy/prometheus/prometheus.yml"),
            targets: Vec::new(),
            extra: Vec::new(),
            interval: Duration::from_secs(2),
            extra_rule_files: Vec::new(),
        }
    }
}

/// The base config with targets, intervals and rule paths rewritten (see the module doc).
pub fn rewrite_config(config: &Config) -> anyhow::Result<String> {
    let extra = config.extra.iter().map(|e| (&e.job, &e.addr));
    for (host, addr) in config.targets.iter().map(|(h, a)| (h, a)).chain(extra) {
        if !addr.ip().is_loopback() {
            bail!("target {host} = {addr}: tests scrape loopback addresses only");
        }
    }
    let text = std::fs::read_to_string(&config.base)
        .with_context(|| format!("read {}", config.base.display()))?;
    let mut doc: Yaml =
        serde_yaml::from_str(&text).with_context(|| format!("parse {}", config.base.display()))?;
    let ms = config.interval.as_millis().max(1);
    let interval = Yaml::from(if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    });
    let base_dir = config.base.parent().unwrap_or(Path::new("."));
    let map = doc
        .as_mapping_mut()
        .ok_or_else(|| anyhow!("{}: not a mapping", config.base.display()))?;
    let global = map
        .entry("global".into())
        .or_insert_with(|| Yaml::Mapping(Default::default()));
    if let Some(g) = global.as_mapping_mut() {
        g.insert("scrape_interval".into(), interval.clone());
        g.insert("evaluation_interval".into(), interval.clone());
        // A timeout may not exceed the interval.
        g.remove("scrape_timeout");
    }
    if let Some(Yaml::Sequence(files)) = map.get_mut("rule_files") {
        for f in files.iter_mut() {
            if let Some(p) = f.as_str()
                && Path::new(p).is_relative()
            {
                *f = Yaml::from(base_dir.join(p).display().to_string());
            }
        }
    }
    if !config.extra_rule_files.is_empty() {
        let files = map
            .entry("rule_files".into())
            .or_insert_with(|| Yaml::Sequence(Vec::new()))
            .as_sequence_mut()
            .ok_or_else(|| anyhow!("{}: rule_files is not a list", config.base.display()))?;
        for f in &config.extra_rule_files {
            let abs =
                std::path::absolute(f).with_context(|| format!("rule file {}", f.display()))?;
            files.push(Yaml::from(abs.display().to_string()));
        }
    }
    if let Some(Yaml::Sequence(jobs)) = map.get_mut("scrape_configs") {
        for job in jobs.iter_mut().filter_map(Yaml::as_mapping_mut) {
            if job.contains_key("scrape_interval") {
                job.insert("scrape_interval".into(), interval.clone());
                job.remove("scrape_timeout");
            }
            let Some(Yaml::Sequence(groups)) = job.get_mut("static_configs") else {
                continue;
            };
            for group in groups.iter_mut().filter_map(Yaml::as_mapping_mut) {
                let old = group
                    .get("targets")
                    .and_then(Yaml::as_sequence)
                    .cloned()
                    .unwrap_or_default();
                let new: Vec<Yaml> = old
                    .iter()
                    .filter_map(Yaml::as_str)
                    .flat_map(|t| {
                        let host = t.rsplit_once(':').map_or(t, |(h, _)| h);
                        config
                            .targets
                            .iter()
                            .filter(move |(h, _)| h == host)
                            .map(|(_, a)| Yaml::from(a.to_string()))
                    })
                    .collect();
                group.insert("targets".into(), Yaml::Sequence(new));
            }
            groups.retain(|g| {
                g.get("targets")
                    .and_then(Yaml::as_sequence)
                    .is_some_and(|t| !t.is_empty())
            });
        }
        for e in &config.extra {
            let job = jobs
                .iter_mut()
                .filter_map(Yaml::as_mapping_mut)
                .find(|j| j.get("job_name").and_then(Yaml::as_str) == Some(e.job.as_str()))
                .ok_or_else(|| anyhow!("no job {} in {}", e.job, config.base.display()))?;
            let mut group = serde_yaml::Mapping::new();
            group.insert(
                "targets".into(),
                Yaml::Sequence(vec![Yaml::from(e.addr.to_string())]),
            );
            if !e.labels.is_empty() {
                let labels = e
                    .labels
                    .iter()
                    .map(|(k, v)| (Yaml::from(k.as_str()), Yaml::from(v.as_str())))
                    .collect();
                group.insert("labels".into(), Yaml::Mapping(labels));
            }
            let groups = job
                .entry("static_configs".into())
                .or_insert_with(|| Yaml::Sequence(Vec::new()));
            if let Some(groups) = groups.as_sequence_mut() {
                groups.push(Yaml::Mapping(group));
            }
        }
    } else if let Some(e) = config.extra.first() {
        bail!("no job {} in {}", e.job, config.base.display());
    }
    serde_yaml::to_string(&doc).context("write the rewritten config")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_targets_intervals_and_rule_paths() {
        let producer: std::net::SocketAddr = "127.0.0.1:9187".parse().expect("addr");
        let replicator: SocketAddr = "127.0.0.1:9189".parse().expect("addr");
        let text = rewrite_config(&Config {
            targets: vec![("producer".into(), producer), ("indexer".into(), producer)],
            extra: vec![ExtraTarget {
                job: "walrelay-consumer".into(),
                addr: replicator,
                labels: [("component".to_string(), "replicator".to_string())].into(),
            }],
            extra_rule_files: vec!["/tmp/compressed.yml".into(), "relative.yml".into()],
            ..Config::default()
        })
        .expect("rewrite");
        let doc: Yaml = serde_yaml::from_str(&text).expect("yaml");
        assert_eq!(doc["global"]["scrape_interval"], Yaml::from("2s"));
        assert_eq!(doc["global"]["evaluation_interval"], Yaml::from("2s"));
        let rules = doc["rule_files"][0].as_str().expect("rule file");
        assert!(
            rules.ends_with("deploy/prometheus/rules/*.yml") && Path::new(rules).is_absolute(),
            "{rules}"
        );
        let files = doc["rule_files"].as_sequence().expect("rule files");
        assert_eq!(files.len(), 3);
        assert_eq!(files[1], Yaml::from("/tmp/compressed.yml"));
        let relative = files[2].as_str().expect("rule file");
        assert!(
            relative.ends_with("/relative.yml") && Path::new(relative).is_absolute(),
            "{relative}"
        );
        let jobs = doc["scrape_configs"].as_sequence().expect("jobs");
        let names: Vec<&str> = jobs.iter().filter_map(|j| j["job_name"].as_str()).collect();
        assert_eq!(names, ["walrelay-producer", "walrelay-consumer"]);
        assert_eq!(
            jobs[0]["static_configs"][0]["targets"][0],
            Yaml::from("127.0.0.1:9187")
        );
        // The notifier has no address here: its group is left out, the indexer's keeps its labels.
        let groups = jobs[1]["static_configs"].as_sequence().expect("groups");
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0]["labels"]["component"], Yaml::from("indexer"));
        assert_eq!(groups[1]["targets"][0], Yaml::from("127.0.0.1:9189"));
        assert_eq!(groups[1]["labels"]["component"], Yaml::from("replicator"));

        let remote: std::net::SocketAddr = "192.0.2.1:9187".parse().expect("addr");
        let err = rewrite_config(&Config {
            targets: vec![("producer".into(), remote)],
            ..Config::default()
        })
        .expect_err("a non-loopback target is refused");
        assert!(err.to_string().contains("loopback"), "{err}");
    }
}
