//! The pprof output: read back by our decoder and by Google's pprof itself.

use profiler_tests::*;

/// pprof has both sample types, the pid/thread/comm labels, the known chain leaf
/// first, and a build id on the program's mapping.
#[test]
fn pprof_has_chain_labels_and_build_ids() {
    let target = start("chain", &["4"]);
    settle();
    let out = tempfile::tempdir().unwrap();
    record(&[target.pid()], 2, 97, out.path());
    let p = read_pprof(out.path());
    let s = |i: i64| p.string_table[i as usize].as_str();
    let types: Vec<(&str, &str)> = p
        .sample_type
        .iter()
        .map(|t| (s(t.r#type), s(t.unit)))
        .collect();
    assert_eq!(types, vec![("samples", "count"), ("cpu", "nanoseconds")]);
    assert_eq!(p.period, 1_000_000_000 / 97);

    let chain = CHAIN_ROOT_FIRST;
    let stacks = pprof_stacks(&p);
    let hit = stacks
        .iter()
        .find(|sample| contains_chain(&sample.frames, &chain))
        .expect("chain in pprof");
    let labels = &hit.labels;
    assert!(
        labels.contains(&("pid".into(), target.pid().to_string())),
        "{labels:?}"
    );
    assert!(
        labels.contains(&("comm".into(), "chain".into())),
        "{labels:?}"
    );
    assert!(
        labels.contains(&("thread".into(), "chain".into())),
        "{labels:?}"
    );

    let program = program("chain");
    let mapping = p
        .mapping
        .iter()
        .find(|m| s(m.filename) == program.to_str().unwrap())
        .expect("mapping of the program");
    assert_eq!(
        s(mapping.build_id).len(),
        40,
        "gcc emits a 20-byte build id"
    );
}

/// Google's pprof reads the file and shows the chain in `-traces`, root at the
/// bottom of each trace (pprof prints leaf first).
#[test]
fn google_pprof_reads_the_profile() {
    let target = start("chain", &["4"]);
    settle();
    let out = tempfile::tempdir().unwrap();
    record(&[target.pid()], 2, 97, out.path());
    let traces = run_pprof(out.path(), &["-traces"]);
    let leaf_first = [
        "spin_leaf",
        "chain_inner",
        "chain_middle",
        "chain_outer",
        "main",
    ];
    let found = traces.split("-----------+").any(|trace| {
        let names: Vec<String> = trace
            .lines()
            .filter_map(|l| l.split_whitespace().last())
            .map(String::from)
            .collect();
        contains_chain(&names, &leaf_first)
    });
    assert!(found, "chain not in pprof -traces output:\n{traces}");
    let top = run_pprof(out.path(), &["-top", "-sample_index=cpu"]);
    assert!(top.contains("spin_leaf"), "{top}");
}
