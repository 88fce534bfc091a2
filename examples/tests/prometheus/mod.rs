//! Reading what the checkout's observability test compares: the Prometheus text
//! exposition `/metrics` serves, the README's Metrics table, and the metrics and labels a
//! PromQL query names.

use std::collections::BTreeMap;

/// One series' labels.
pub(crate) type Labels = BTreeMap<String, String>;

/// A name as Prometheus renders it: every character outside `[A-Za-z0-9_]` becomes `_`.
pub(crate) fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The families (`# TYPE` lines) and the label sets of their samples.
#[derive(Debug, Default)]
pub(crate) struct Exposition {
    /// Family name -> `counter`, `gauge`, `histogram` or `summary`.
    pub(crate) kinds: BTreeMap<String, String>,
    /// Sample name (a histogram's `_bucket`, `_sum`, `_count` apart) -> label sets.
    samples: BTreeMap<String, Vec<Labels>>,
}

impl Exposition {
    /// Parses the text format; panics on a line it cannot read.
    pub(crate) fn parse(text: &str) -> Self {
        let mut exposition = Exposition::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                exposition.kinds.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let end = line.find(['{', ' ']).unwrap();
            let (name, rest) = line.split_at(end);
            let (labels, value) = match rest.strip_prefix('{') {
                Some(rest) => labels(rest),
                None => (Labels::new(), rest),
            };
            let value = value.trim();
            assert!(
                value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
                "bad sample value in {line:?}"
            );
            exposition
                .samples
                .entry(name.to_owned())
                .or_default()
                .push(labels);
        }
        exposition
    }

    /// The family a sample name belongs to (`x_bucket` to the histogram `x`), if served.
    pub(crate) fn family_of<'a>(&self, sample: &'a str) -> Option<&'a str> {
        if self.kinds.contains_key(sample) {
            return Some(sample);
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = sample.strip_suffix(suffix)?;
            matches!(self.kinds.get(base)?.as_str(), "histogram" | "summary").then_some(base)
        })
    }

    /// The label sets of `family`'s series (a histogram's from its `_count` samples, so
    /// without `le`).
    pub(crate) fn series(&self, family: &str) -> &[Labels] {
        let name = match self.kinds.get(family).map(String::as_str) {
            Some("histogram" | "summary") => format!("{family}_count"),
            _ => family.to_owned(),
        };
        self.samples.get(&name).map_or(&[], Vec::as_slice)
    }
}

/// Parses `k="v",...}` and returns the labels and what follows the `}`.
fn labels(text: &str) -> (Labels, &str) {
    let mut labels = Labels::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return (labels, after);
        }
        let (key, after) = rest.split_once("=\"").unwrap();
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().unwrap() {
                (_, '\\') => match chars.next().unwrap().1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        rest = &after[end + 1..];
    }
}

/// One metric of the README's Metrics table.
#[derive(Debug, Clone)]
pub(crate) struct Documented {
    /// As documented (`sd.lock.acquire.duration`).
    pub(crate) name: String,
    /// `counter`, `gauge` or `histogram`.
    pub(crate) kind: String,
    /// `s` for seconds, else what is counted.
    pub(crate) unit: String,
    /// Label keys, each with the values the table lists for it (often none).
    pub(crate) labels: Vec<(String, Vec<String>)>,
}

impl Documented {
    /// Every metric of the table under `## Metrics` in `readme` (a row may name several).
    pub(crate) fn from_readme(readme: &str) -> Vec<Self> {
        let section = readme
            .split("\n## ")
            .find(|s| s.starts_with("Metrics\n"))
            .expect("a Metrics section in the README");
        let mut metrics = Vec::new();
        for row in section.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let [_, names, kind, unit, labels, ..] = cells.as_slice() else {
                panic!("a Metrics row of four cells: {row}");
            };
            let labels = documented_labels(labels);
            for name in ticked(names) {
                metrics.push(Documented {
                    name: name.to_owned(),
                    kind: (*kind).to_owned(),
                    unit: (*unit).to_owned(),
                    labels: labels.clone(),
                });
            }
        }
        assert!(metrics.len() > 10, "the Metrics table was not read");
        metrics
    }

    /// The family name metrics-exporter-prometheus renders with recommended naming:
    /// dots as underscores, `_seconds` for a unit of seconds, `_total` for a counter.
    pub(crate) fn prometheus_name(&self) -> String {
        let mut name = sanitize(&self.name);
        if self.unit == "s" {
            name.push_str("_seconds");
        }
        if self.kind == "counter" {
            name.push_str("_total");
        }
        name
    }
}

/// The `backticked` words of `text`.
fn ticked(text: &str) -> impl Iterator<Item = &str> {
    text.split('`').skip(1).step_by(2)
}

/// The labels cell: `` `key` `` at the top level, and `` (`value`, ...) `` after a key
/// for the values it takes (prose in parentheses names none).
fn documented_labels(cell: &str) -> Vec<(String, Vec<String>)> {
    let mut labels: Vec<(String, Vec<String>)> = Vec::new();
    let mut depth = 0_usize;
    let mut rest = cell;
    while let Some(i) = rest.find(['(', ')', '`']) {
        let c = rest.as_bytes()[i];
        rest = &rest[i + 1..];
        match c {
            b'(' => depth += 1,
            b')' => depth = depth.saturating_sub(1),
            _ => {
                let (word, after) = rest.split_once('`').unwrap();
                rest = after;
                match (depth, labels.last_mut()) {
                    (0, _) => labels.push((word.to_owned(), Vec::new())),
                    (_, Some((_, values))) => values.push(word.to_owned()),
                    (_, None) => panic!("a label value before any key: {cell}"),
                }
            }
        }
    }
    labels
}

/// The metrics a PromQL expression selects (with their `key="value"` matchers) and the
/// labels it groups by (`by (..)`, `without (..)`, but `le`). Metric names are the
/// identifiers that start with `sd_` or `messaging_` outside braces and groupings.
#[derive(Debug, Default)]
pub(crate) struct Query {
    pub(crate) metrics: Vec<(String, Vec<(String, String)>)>,
    pub(crate) grouping: Vec<String>,
}

impl Query {
    pub(crate) fn parse(expr: &str) -> Self {
        let mut query = Query::default();
        let chars: Vec<char> = expr.chars().collect();
        let mut i = 0;
        let ident = |i: &mut usize| {
            let start = *i;
            while *i < chars.len()
                && (chars[*i].is_ascii_alphanumeric() || chars[*i] == '_' || chars[*i] == ':')
            {
                *i += 1;
            }
            chars[start..*i].iter().collect::<String>()
        };
        let skip_space = |i: &mut usize| {
            while *i < chars.len() && chars[*i].is_whitespace() {
                *i += 1;
            }
        };
        while i < chars.len() {
            let c = chars[i];
            if c == '$' {
                // A Grafana variable ($__rate_interval).
                i += 1;
                ident(&mut i);
            } else if c.is_ascii_digit() || c == '.' {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            } else if c.is_ascii_alphabetic() || c == '_' {
                let word = ident(&mut i);
                skip_space(&mut i);
                if (word == "by" || word == "without") && chars.get(i) == Some(&'(') {
                    let close = i + chars[i..].iter().position(|c| *c == ')').unwrap();
                    let inside: String = chars[i + 1..close].iter().collect();
                    query.grouping.extend(
                        inside
                            .split(',')
                            .map(str::trim)
                            .filter(|l| !l.is_empty() && *l != "le")
                            .map(str::to_owned),
                    );
                    i = close + 1;
                } else if word.starts_with("sd_") || word.starts_with("messaging_") {
                    let mut matchers = Vec::new();
                    if chars.get(i) == Some(&'{') {
                        let close = i + chars[i..].iter().position(|c| *c == '}').unwrap();
                        let inside: String = chars[i + 1..close].iter().collect();
                        for matcher in inside.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                            // Only equality matchers name a value that must exist.
                            if let Some((key, value)) = matcher.split_once('=')
                                && !key.ends_with('!')
                                && !value.starts_with('~')
                            {
                                let value = value.trim().trim_matches('"');
                                matchers.push((key.trim().to_owned(), value.to_owned()));
                            }
                        }
                        i = close + 1;
                    }
                    query.metrics.push((word, matchers));
                }
            } else if c == '"' {
                i += 1 + chars[i + 1..].iter().position(|c| *c == '"').unwrap_or(0) + 1;
            } else {
                i += 1;
            }
        }
        query
    }
}
