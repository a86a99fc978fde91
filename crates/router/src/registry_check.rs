//! `registry validate` and `registry diff`: how their answers print, and the exit
//! code that says whether every record is valid; `registry status` with its
//! quarantined records as a table.

use serde_json::Value;

use crate::cli::Output;

/// `registry validate` found invalid records (exit code 9, after printing them).
#[derive(Debug, thiserror::Error)]
#[error("{0} invalid record(s) in the source (listed above); a reload would quarantine them")]
pub struct InvalidRecords(pub usize);

/// Prints a `ValidateRegistry` answer; fails with [`InvalidRecords`] unless valid.
pub fn validate(output: Output, v: &Value) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Output::Table => print!("{}", validate_table(v)),
    }
    let invalid = v["invalid"].as_array().map_or(0, Vec::len);
    if v["valid"] == Value::Bool(true) {
        Ok(())
    } else {
        Err(InvalidRecords(invalid.max(1)).into())
    }
}

/// A `GetRegistryStatus` or `ReloadRegistry` answer for people: the fields, then
/// each quarantined record.
pub fn status_table(v: &Value) -> String {
    let mut fields = v.clone();
    let quarantined = fields
        .as_object_mut()
        .and_then(|m| m.remove("quarantined"))
        .and_then(|q| q.as_array().cloned())
        .unwrap_or_default();
    let mut out = crate::ops::render_fields(&fields);
    out.push_str(&format!("quarantined  {}\n", quarantined.len()));
    if !quarantined.is_empty() {
        out.push_str(&quarantine_table(&quarantined, true));
    }
    out
}

/// Quarantined (or invalid) records: a table, then each full message.
fn quarantine_table(records: &[Value], with_serving: bool) -> String {
    let mut headers = vec!["table", "key", "field", "reason"];
    if with_serving {
        headers.extend(["serving", "since"]);
    }
    let rows = records
        .iter()
        .map(|q| headers.iter().map(|h| text(&q[*h])).collect())
        .collect();
    let mut out = String::from("\n");
    out.push_str(&columns(&headers, rows));
    out.push('\n');
    for q in records {
        out.push_str(&format!("{}\n", text(&q["error"])));
    }
    out
}

/// Prints a `DiffRegistry` answer.
pub fn diff(output: Output, v: &Value) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Output::Table => print!("{}", diff_table(v)),
    }
    Ok(())
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn counts(v: &Value) -> String {
    ["extensions", "versions", "instances", "policies"]
        .iter()
        .map(|k| format!("{} {k}", text(&v[*k])))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rows as aligned columns under upper-case headers.
fn columns(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([headers[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
            + "\n"
    };
    let mut out = line(headers.iter().map(|h| h.to_uppercase()).collect());
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

fn validate_table(v: &Value) -> String {
    let invalid = v["invalid"].as_array().cloned().unwrap_or_default();
    let mut out = format!(
        "source  {} {}\nvalid   {} ({} invalid; valid records: {})\n",
        text(&v["source"]),
        text(&v["location"]),
        text(&v["valid"]),
        invalid.len(),
        counts(&v["counts"])
    );
    if !invalid.is_empty() {
        out.push_str(&quarantine_table(&invalid, false));
    }
    for w in v["warnings"].as_array().into_iter().flatten() {
        out.push_str(&format!("warning: {}\n", text(w)));
    }
    out
}

fn diff_table(v: &Value) -> String {
    let mut out = format!(
        "source   {} {} (against the serving generation {})\nchanges  {}\n",
        text(&v["source"]),
        text(&v["location"]),
        text(&v["generation"]),
        text(&v["changes"])
    );
    let mut rows = Vec::new();
    for table in [
        "extensions",
        "extension_versions",
        "extension_instances",
        "policies",
    ] {
        let d = &v[table];
        for k in d["added"].as_array().into_iter().flatten() {
            rows.push(vec![table.into(), "added".into(), text(k), String::new()]);
        }
        for c in d["changed"].as_array().into_iter().flatten() {
            let fields = c["fields"]
                .as_array()
                .map(|f| f.iter().map(text).collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            rows.push(vec![
                table.into(),
                "changed".into(),
                text(&c["key"]),
                fields,
            ]);
        }
        for k in d["removed"].as_array().into_iter().flatten() {
            rows.push(vec![table.into(), "removed".into(), text(k), String::new()]);
        }
    }
    if !rows.is_empty() {
        out.push('\n');
        out.push_str(&columns(&["table", "change", "key", "fields"], rows));
    }
    for q in v["quarantine_entering"].as_array().into_iter().flatten() {
        out.push_str(&format!("would quarantine: {}\n", text(&q["error"])));
    }
    for k in v["quarantine_leaving"].as_array().into_iter().flatten() {
        out.push_str(&format!("would leave quarantine: {}\n", text(k)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validate_lists_each_invalid_record_and_fails() {
        let v = json!({"valid": false, "source": "database", "location": "postgres://x/db",
            "counts": {"extensions": 4, "versions": 0, "instances": 0, "policies": 0},
            "invalid": [{"table": "policies", "key": "acme/default", "field": "policy.providers[0]",
                "reason": "expected an object", "error": "policies[acme/default].policy.providers[0]: expected an object"}],
            "warnings": []});
        let t = validate_table(&v);
        assert!(
            t.contains("policies  acme/default  policy.providers[0]  expected an object"),
            "{t}"
        );
        let e = validate(Output::Json, &v).unwrap_err();
        assert_eq!(e.downcast_ref::<InvalidRecords>().map(|e| e.0), Some(1));
        assert!(validate(Output::Json, &json!({"valid": true})).is_ok());
    }

    #[test]
    fn diff_lists_changes_per_table() {
        let v = json!({"changes": 2, "source": "database", "location": "l", "generation": 3,
            "extensions": {"added": [], "changed": [{"key": "n", "fields": ["timeout_ms"]}], "removed": ["gone"]},
            "extension_versions": {}, "extension_instances": {}, "policies": {},
            "quarantine_entering": [], "quarantine_leaving": []});
        let t = diff_table(&v);
        assert!(t.contains("extensions  changed  n     timeout_ms"), "{t}");
        assert!(t.contains("extensions  removed  gone"), "{t}");
    }
}
