use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::metrics::status::parse_answer;

/// A STATUS as the control protocol v1 describes it, with a singleton and a hook point whose
/// names need escaping.
const SAMPLE: &str = r#"{"v":1,"ok":true,"status":{
 "master": {"pid":100, "version":"0.1.0", "config":"/etc/presup/supervisor.toml", "started_unix":1700000000.25,
            "uptime_seconds":12.5, "generation":3, "stage":"running", "status":"3 workers up",
            "workers_target":3, "preload":true, "runtime_dir":"/run/presup-100-abcd0123"},
 "workers": [
   {"slot":0, "pid":201, "generation":3, "state":"up", "started_unix":1700000001.0, "uptime_seconds":11.0, "status_text":null},
   {"slot":1, "pid":202, "generation":3, "state":"up", "started_unix":1700000001.0, "uptime_seconds":11.0, "status_text":"busy"},
   {"slot":2, "pid":203, "generation":3, "state":"starting", "started_unix":1700000012.0, "uptime_seconds":0.5, "status_text":null},
   {"slot":1, "pid":150, "generation":2, "state":"draining", "started_unix":1700000000.5, "uptime_seconds":12.0, "status_text":null}
 ],
 "slots": [ {"slot":0, "restarts":0, "last_exit":null},
            {"slot":1, "restarts":4, "last_exit":{"status":"killed by SIGKILL","code":null,"signal":"SIGKILL","at_unix":1700000005.0}},
            {"slot":2, "restarts":1, "last_exit":null} ],
 "singletons": [
   {"name":"sched\"ul\\er\n2", "pid":300, "state":"up", "started_unix":1700000000.5, "uptime_seconds":12.0,
    "restarts":2, "last_exit":null, "status_text":null},
   {"name":"cron", "pid":null, "state":"failed", "started_unix":null, "uptime_seconds":null,
    "restarts":7, "last_exit":null, "status_text":null}
 ],
 "stems": [ {"pid":400, "generation":3, "state":"ready", "uptime_seconds":12.0, "forks":5, "pending":0} ],
 "hooks": [],
 "last_reload": {"id":2, "generation":3, "result":"done", "why":null, "errors":[], "at_unix":1700000010.0},
 "counters": {"worker_exits": {"crash":4, "boot_failure":1, "stopped":2, "watchdog":0},
              "reloads": {"done":2, "undone":1, "rejected":0},
              "hook_runs": [ {"point":"on_starting", "result":"ok", "count":1},
                             {"point":"on_reload", "result":"failed", "count":3} ]},
 "tickets": [ {"name":"identify", "interval_seconds":5.0,
               "buckets":[{"bucket":0,"next_free_in_seconds":0.0},{"bucket":1,"next_free_in_seconds":3.5}],
               "grants":23, "wait_seconds_total":41.5, "daily_limit":1000, "daily_left":977},
              {"name":"plain", "interval_seconds":1.0, "buckets":[{"bucket":0,"next_free_in_seconds":0.0}],
               "grants":0, "wait_seconds_total":null, "daily_limit":null, "daily_left":null} ],
 "restarts_done": []
}}"#;

/// A family as read back: its TYPE, its samples (labels unescaped, value).
#[derive(Debug, Default)]
struct Read {
    kind: String,
    samples: Vec<(BTreeMap<String, String>, String)>,
}

/// Reads an exposition back strictly: HELP then TYPE once per family, before its samples;
/// every sample of a declared family, its labels quoted and escaped as the format says.
fn read_back(text: &str) -> BTreeMap<String, Read> {
    let mut families: BTreeMap<String, Read> = BTreeMap::new();
    let mut current = String::new();
    let mut help_seen = BTreeSet::new();
    assert!(text.ends_with('\n'), "the last line ends with a line feed");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap().to_owned();
            assert!(help_seen.insert(name.clone()), "two HELP lines for {name}");
            assert!(!families.contains_key(&name), "HELP after TYPE or samples of {name}");
            current = name;
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert_eq!(name, current, "TYPE right after the HELP of its family");
            assert!(families
                .insert(name.into(), Read { kind: kind.into(), ..Read::default() })
                .is_none());
        } else if line.starts_with('#') {
            continue;
        } else {
            let (name, labels, value) = sample(line);
            assert_eq!(name, current, "sample {line:?} outside its family");
            let fam = families.get_mut(&name).unwrap();
            assert!(!fam.samples.iter().any(|(l, _)| *l == labels), "duplicate {line:?}");
            fam.samples.push((labels, value));
        }
    }
    families
}

fn sample(line: &str) -> (String, BTreeMap<String, String>, String) {
    let name_end = line.find(['{', ' ']).unwrap();
    let name = line[..name_end].to_owned();
    assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{name}");
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices();
        loop {
            let (start, c) = chars.next().unwrap();
            if c == '}' {
                rest = &r[start + 1..];
                break;
            }
            let eq = r[start..].find("=\"").unwrap() + start;
            let label = r[start..eq].trim_start_matches(',').to_owned();
            while chars.next().unwrap().0 < eq + 1 {}
            let mut value = String::new();
            loop {
                match chars.next().unwrap().1 {
                    '"' => break,
                    '\\' => match chars.next().unwrap().1 {
                        'n' => value.push('\n'),
                        c @ ('\\' | '"') => value.push(c),
                        c => panic!("bad escape \\{c} in {line:?}"),
                    },
                    '\n' => panic!("raw line feed"),
                    c => value.push(c),
                }
            }
            labels.insert(label, value);
        }
    }
    let value = rest.strip_prefix(' ').unwrap().to_owned();
    assert!(value == "NaN" || value.ends_with("Inf") || value.parse::<f64>().is_ok(), "{line:?}");
    (name, labels, value)
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn value(f: &BTreeMap<String, Read>, name: &str, l: &[(&str, &str)]) -> Option<String> {
    let fam = f.get(name).unwrap_or_else(|| panic!("no family {name}"));
    fam.samples.iter().find(|(s, _)| *s == labels(l)).map(|(_, v)| v.clone())
}

fn rendered() -> String {
    let status = parse_answer(SAMPLE.as_bytes()).unwrap();
    let mut memory = BTreeMap::new();
    // 203 (starting) is not read: it is not listed. 400 is the stem, 300 a singleton.
    for (pid, rss) in [(201, 10), (202, 20), (150, 30), (300, 40), (400, 50)] {
        memory.insert(pid, Memory { rss: rss << 20, pss: rss << 19 });
    }
    let master = Process {
        cpu_seconds: 1.25,
        resident_bytes: 3 << 20,
        virtual_bytes: 9 << 20,
        start_time: 1700000000.0,
        open_fds: Some(17),
        max_fds: None,
    };
    render(&Scrape { status: &status, memory: &memory, master: Some(master) })
}

#[test]
fn every_family_has_help_and_type_and_the_names_follow_the_conventions() {
    let text = rendered();
    let f = read_back(&text);
    for (name, fam) in &f {
        assert!(name.starts_with("presup_") || name.starts_with("process_"), "{name}");
        match fam.kind.as_str() {
            "counter" => assert!(name.ends_with("_total"), "counter {name}"),
            "gauge" => assert!(!name.ends_with("_total"), "gauge {name}"),
            k => panic!("{name}: type {k}"),
        }
        for unit in ["_kb", "_mb", "_ms", "_milliseconds", "_kilobytes"] {
            assert!(!name.contains(unit), "{name}: not a base unit");
        }
    }
    let expected = [
        "presup_up",
        "presup_build_info",
        "presup_master_start_time_seconds",
        "presup_master_uptime_seconds",
        "presup_generation",
        "presup_workers_target",
        "presup_workers",
        "presup_worker_restarts_total",
        "presup_worker_exits_total",
        "presup_worker_resident_memory_bytes",
        "presup_worker_proportional_memory_bytes",
        "presup_singleton_up",
        "presup_singleton_restarts_total",
        "presup_singleton_resident_memory_bytes",
        "presup_singleton_proportional_memory_bytes",
        "presup_stem_forks_total",
        "presup_stem_resident_memory_bytes",
        "presup_stem_proportional_memory_bytes",
        "presup_reloads_total",
        "presup_hook_runs_total",
        "presup_ticket_grants_total",
        "presup_ticket_wait_seconds_total",
        "presup_ticket_daily_remaining",
        "presup_ticket_next_free_seconds",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ];
    let names: BTreeSet<&str> = f.keys().map(String::as_str).collect();
    assert_eq!(names, expected.into_iter().collect::<BTreeSet<_>>());
    assert_eq!(f["presup_workers"].kind, "gauge");
    assert_eq!(f["presup_worker_restarts_total"].kind, "counter");
}

#[test]
fn the_values_are_those_of_the_status() {
    let f = read_back(&rendered());
    let v = |name: &str, l: &[(&str, &str)]| value(&f, name, l);
    let s = |x: &str| Some(x.to_owned());
    assert_eq!(v("presup_up", &[]), s("1"));
    assert_eq!(v("presup_build_info", &[("version", "0.1.0")]), s("1"));
    assert_eq!(v("presup_master_start_time_seconds", &[]), s("1700000000.25"));
    assert_eq!(v("presup_master_uptime_seconds", &[]), s("12.5"));
    assert_eq!(v("presup_generation", &[]), s("3"));
    assert_eq!(v("presup_workers_target", &[]), s("3"));
    for (state, n) in [("up", "2"), ("starting", "1"), ("draining", "1"), ("stopping", "0")] {
        assert_eq!(v("presup_workers", &[("state", state)]), s(n), "{state}");
    }
    assert_eq!(f["presup_workers"].samples.len(), 4);
    for (slot, n) in [("0", "0"), ("1", "4"), ("2", "1")] {
        assert_eq!(v("presup_worker_restarts_total", &[("slot", slot)]), s(n));
    }
    for (kind, n) in [("crash", "4"), ("boot_failure", "1"), ("stopped", "2"), ("watchdog", "0")] {
        assert_eq!(v("presup_worker_exits_total", &[("kind", kind)]), s(n));
    }
    // Memory of the workers that could be read, the old generation's draining one included.
    let rss = "presup_worker_resident_memory_bytes";
    assert_eq!(v(rss, &[("slot", "0"), ("pid", "201")]), s(&(10u64 << 20).to_string()));
    assert_eq!(v(rss, &[("slot", "1"), ("pid", "150")]), s(&(30u64 << 20).to_string()));
    assert_eq!(f[rss].samples.len(), 3, "203 could not be read: skipped");
    let pss = "presup_worker_proportional_memory_bytes";
    assert_eq!(v(pss, &[("slot", "1"), ("pid", "202")]), s(&(20u64 << 19).to_string()));
    // Singletons: the name escaped and read back whole; one without a pid has no memory.
    let odd = "sched\"ul\\er\n2";
    assert_eq!(v("presup_singleton_up", &[("name", odd)]), s("1"));
    assert_eq!(v("presup_singleton_up", &[("name", "cron")]), s("0"));
    assert_eq!(v("presup_singleton_restarts_total", &[("name", "cron")]), s("7"));
    assert_eq!(
        v("presup_singleton_resident_memory_bytes", &[("name", odd)]),
        s(&(40u64 << 20).to_string())
    );
    assert_eq!(f["presup_singleton_proportional_memory_bytes"].samples.len(), 1);
    assert_eq!(v("presup_stem_forks_total", &[("generation", "3")]), s("5"));
    assert_eq!(
        v("presup_stem_resident_memory_bytes", &[("generation", "3")]),
        s(&(50u64 << 20).to_string())
    );
    for (result, n) in [("done", "2"), ("undone", "1"), ("rejected", "0")] {
        assert_eq!(v("presup_reloads_total", &[("result", result)]), s(n));
    }
    assert_eq!(
        v("presup_hook_runs_total", &[("point", "on_reload"), ("result", "failed")]),
        s("3")
    );
    assert_eq!(v("presup_ticket_grants_total", &[("ticket", "plain")]), s("0"));
    assert_eq!(v("presup_ticket_wait_seconds_total", &[("ticket", "identify")]), s("41.5"));
    assert_eq!(f["presup_ticket_wait_seconds_total"].samples.len(), 1, "only when given");
    assert_eq!(v("presup_ticket_daily_remaining", &[("ticket", "identify")]), s("977"));
    assert_eq!(f["presup_ticket_daily_remaining"].samples.len(), 1, "only when given");
    let next = "presup_ticket_next_free_seconds";
    assert_eq!(v(next, &[("ticket", "identify"), ("bucket", "1")]), s("3.5"));
    assert_eq!(f[next].samples.len(), 3);
    assert_eq!(v("process_cpu_seconds_total", &[]), s("1.25"));
    assert_eq!(v("process_resident_memory_bytes", &[]), s(&(3u64 << 20).to_string()));
    assert_eq!(v("process_open_fds", &[]), s("17"));
    assert!(f["process_max_fds"].samples.is_empty(), "unlimited: no sample");
}

#[test]
fn escaping_and_numbers_as_the_format_spells_them() {
    assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    assert_eq!(escape_help("x\\y\nz \"q\""), "x\\\\y\\nz \"q\"");
    let text = rendered();
    assert!(text.contains(r#"presup_singleton_up{name="sched\"ul\\er\n2"} 1"#), "{text}");
    assert_eq!(number(f64::NAN), "NaN");
    assert_eq!(number(f64::INFINITY), "+Inf");
    assert_eq!(number(f64::NEG_INFINITY), "-Inf");
    assert_eq!(number(3.0), "3");
    assert_eq!(number(1e20), "100000000000000000000");
    assert_eq!(number(0.000125), "0.000125");
}

#[test]
fn an_empty_status_still_has_every_family_and_no_duplicate() {
    let mut status = parse_answer(br#"{"v":1,"ok":true,"status":{}}"#).unwrap();
    // A worker listed twice (which a master never sends) must not make two equal samples.
    let w = crate::metrics::status::Worker { slot: 0, pid: 9, generation: 1, state: "up".into() };
    status.workers = vec![w.clone(), w];
    let memory = BTreeMap::from([(9, Memory { rss: 1, pss: 1 })]);
    let text = render(&Scrape { status: &status, memory: &memory, master: None });
    let f = read_back(&text);
    assert_eq!(f.len(), 30);
    assert_eq!(value(&f, "presup_workers", &[("state", "up")]).as_deref(), Some("2"));
    assert_eq!(f["presup_worker_resident_memory_bytes"].samples.len(), 1);
    assert!(f["process_cpu_seconds_total"].samples.is_empty());
    assert_eq!(value(&f, "presup_reloads_total", &[("result", "undone")]).as_deref(), Some("0"));
}

#[test]
fn down_is_presup_up_0_with_the_reason_in_a_comment() {
    let text = render_down("cannot connect\nto x");
    assert!(text.starts_with("# presup: cannot connect to x\n"), "{text}");
    let f = read_back(&text);
    assert_eq!(f.len(), 1);
    assert_eq!(value(&f, "presup_up", &[]).as_deref(), Some("0"));
}
