//! A walrelay process's `/metrics` read by a test: one scrape, then samples by family name.
//!
//! The exposition is Prometheus' text format as the `prometheus` crate writes it: one sample per
//! line, `name{labels} value`, no timestamps. A family's name matches only itself
//! (`walrelay_x` does not match `walrelay_x_total`).

/// One scrape of a process's `/metrics`.
pub struct Exposition(String);

/// Scrapes `http://{addr}/metrics`; `None` while the process does not answer.
pub async fn scrape(addr: &str) -> Option<Exposition> {
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(Exposition(body))
}

/// The unlabelled sample `name` of the process at `addr`; `None` when it does not answer or has
/// no such sample.
pub async fn value(addr: &str, name: &str) -> Option<f64> {
    scrape(addr).await?.value(name)
}

/// The sum of every sample of family `name` (all label sets) at `addr`: 0 when the family has
/// none, `None` when the process does not answer.
pub async fn sum(addr: &str, name: &str) -> Option<f64> {
    Some(scrape(addr).await?.sum(name))
}

impl Exposition {
    /// The whole text, for a failure message or an exact-line check.
    pub fn text(&self) -> &str {
        &self.0
    }

    /// The sample of `name` without labels.
    pub fn value(&self, name: &str) -> Option<f64> {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// The sum of the samples of family `name`, labelled or not.
    pub fn sum(&self, name: &str) -> f64 {
        self.0
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::Exposition;

    const TEXT: &str = "# HELP walrelay_x A gauge.\n\
        # TYPE walrelay_x gauge\n\
        walrelay_x 3\n\
        walrelay_x_total 100\n\
        walrelay_y{kind=\"a\"} 2\n\
        walrelay_y{kind=\"b\"} 5.5\n";

    #[test]
    fn a_family_matches_only_itself() {
        let e = Exposition(TEXT.to_owned());
        assert_eq!(e.value("walrelay_x"), Some(3.0));
        assert_eq!(e.sum("walrelay_x"), 3.0);
        assert_eq!(e.value("walrelay_x_total"), Some(100.0));
        assert_eq!(
            e.value("walrelay_y"),
            None,
            "labelled samples have no plain value"
        );
        assert_eq!(e.sum("walrelay_y"), 7.5);
        assert_eq!(e.sum("walrelay_z"), 0.0);
        assert_eq!(e.value("walrelay_z"), None);
    }
}
