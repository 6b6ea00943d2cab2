//! Scenario files: parse errors name the line and the field; semantic errors name the field;
//! every shipped scenario is valid.

use aoai_sim::Scenario;

const VALID: &str = r#"
seed = 1

[[regions]]
name = "eastus2"

[[resources]]
name = "east"
region = "eastus2"
api_key = "k"

[[resources.deployments]]
name = "gpt-4o"
tpm = 1000
"#;

#[test]
fn a_minimal_scenario_parses() {
    let s = Scenario::from_toml(VALID).unwrap();
    assert_eq!(s.resources[0].deployments[0].tpm, 1000);
    assert_eq!(s.resources[0].deployments[0].rpm_windows_s, [10]);
}

#[test]
fn an_unknown_field_names_its_line_and_field() {
    let text = VALID.replace("tpm = 1000", "tpm = 1000\ntmp = 5");
    let e = Scenario::from_toml(&text).unwrap_err();
    assert_eq!(e.line, Some(15));
    assert_eq!(e.field, "resources.deployments.tmp");
    assert!(e.message.contains("unknown field `tmp`"), "{}", e.message);
    assert!(
        e.to_string()
            .starts_with("line 15: field `resources.deployments.tmp`")
    );
}

#[test]
fn a_wrong_type_names_its_line_and_field() {
    let text = VALID.replace("tpm = 1000", "tpm = \"lots\"");
    let e = Scenario::from_toml(&text).unwrap_err();
    assert_eq!(e.line, Some(14));
    assert_eq!(e.field, "resources.deployments.tpm");
}

#[test]
fn a_missing_field_is_named() {
    let text = VALID.replace("api_key = \"k\"\n", "");
    let e = Scenario::from_toml(&text).unwrap_err();
    assert!(e.field.ends_with("api_key"), "{e}");
    assert!(e.line.is_some());
}

#[test]
fn a_bad_enum_value_names_its_field() {
    let text = VALID.replace("tpm = 1000", "tpm = 1000\nkind = \"dedicated\"");
    let e = Scenario::from_toml(&text).unwrap_err();
    assert_eq!(e.field, "resources.deployments.kind");
    assert_eq!(e.line, Some(15));
}

#[test]
fn an_event_naming_an_unknown_region_names_the_field() {
    let text = format!(
        "{VALID}\n[[events]]\nkind = \"outage\"\nregion = \"mars\"\nstart_s = 1\nend_s = 2\n"
    );
    let e = Scenario::from_toml(&text).unwrap_err();
    assert_eq!(e.field, "events[0].region");
    assert!(e.message.contains("unknown region `mars`"));
}

#[test]
fn semantic_errors_name_the_field() {
    let cases = [
        (
            VALID.replace("region = \"eastus2\"", "region = \"westus\""),
            "resources[0].region",
        ),
        (
            VALID.replace("tpm = 1000", "tpm = 0"),
            "resources[0].deployments[0].tpm",
        ),
        (
            VALID.replace("tpm = 1000", "tpm = 1000\nspillover_to = \"x\""),
            "resources[0].deployments[0].spillover_to",
        ),
        (
            VALID.replace(
                "tpm = 1000",
                "tpm = 1000\nkind = \"provisioned\"\nspillover_to = \"x\"",
            ),
            "resources[0].deployments[0].spillover_to",
        ),
        (
            VALID.replace("tpm = 1000", "tpm = 1000\nrpm = 6\nrpm_per_1000_tpm = 6.0"),
            "resources[0].deployments[0].rpm_per_1000_tpm",
        ),
        (
            VALID.replace("tpm = 1000", "tpm = 1000\nrpm_windows_s = [0]"),
            "resources[0].deployments[0].rpm_windows_s",
        ),
        (
            format!(
                "{VALID}\n[[events]]\nkind = \"slow\"\nregion = \"eastus2\"\nstart_s = 5\nend_s = 2\n"
            ),
            "events[0].end_s",
        ),
        (
            format!(
                "{VALID}\n[[events]]\nkind = \"high_demand\"\nresource = \"east\"\nstart_s = 1\nend_s = 2\n"
            ),
            "events[0].resource",
        ),
        (
            format!(
                "{VALID}\n[workload]\nduration_s = 10\ntargets = [\"east/gpt-5\"]\n[[workload.arrivals]]\nkind = \"steady\"\nrate_per_s = 1.0\n"
            ),
            "workload.targets[0]",
        ),
        (
            format!(
                "{VALID}\n[workload]\nduration_s = 10\ntargets = [\"east/gpt-4o\"]\n[[workload.arrivals]]\nkind = \"steady\"\n"
            ),
            "workload.arrivals[0].rate_per_s",
        ),
        (
            VALID.replace("seed = 1", "seed = 1\n[tokens]\nchars_per_token = 0.0"),
            "tokens.chars_per_token",
        ),
        (
            format!(
                "{VALID}\n[[events]]\nkind = \"outage\"\nresource = \"east\"\ndeployment = \"gpt-5\"\nstart_s = 1\nend_s = 2\n"
            ),
            "events[0].deployment",
        ),
        (
            format!(
                "{VALID}\n[[events]]\nkind = \"outage\"\nregion = \"eastus2\"\ndeployment = \"gpt-4o\"\nstart_s = 1\nend_s = 2\n"
            ),
            "events[0].deployment",
        ),
    ];
    for (text, field) in cases {
        let e = Scenario::from_toml(&text).unwrap_err();
        assert_eq!(e.field, field, "{e}");
    }
}

#[test]
fn every_shipped_scenario_is_valid_and_has_a_workload() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let s = Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(s.workload.is_some(), "{}", path.display());
            names.push(path.file_stem().unwrap().to_string_lossy().to_string());
        }
    }
    names.sort();
    for expected in [
        "one-region-slow",
        "ptu-spillover",
        "regional-outage",
        "seed-403-idle-burst",
        "seed-429-peak-low-traffic",
        "seed-429-regional",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing");
    }
}

#[test]
fn the_readme_example_is_valid() {
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/README.md"),
    )
    .unwrap();
    let start = readme.find("```toml\n").unwrap() + "```toml\n".len();
    let end = start + readme[start..].find("```").unwrap();
    let s = Scenario::from_toml(&readme[start..end]).unwrap_or_else(|e| panic!("{e}"));
    assert!(s.workload.is_some());
}

#[test]
fn errors_inside_inline_tables_name_the_inner_key() {
    let text = VALID.replace(
        "name = \"eastus2\"\n",
        "name = \"eastus2\"\nlatency = { first_token_ms = \"slow\", per_token_ms = 3 }\n",
    );
    let e = Scenario::from_toml(&text).unwrap_err();
    assert_eq!(e.line, Some(6));
    assert_eq!(e.field, "regions.latency.first_token_ms");
    let text = VALID.replace(
        "name = \"eastus2\"\n",
        "name = \"eastus2\"\nlatency = { first_token_ms = 3, per_tokn_ms = 3 }\n",
    );
    let e = Scenario::from_toml(&text).unwrap_err();
    assert_eq!(e.line, Some(6));
    assert_eq!(e.field, "regions.latency.per_tokn_ms");
}
