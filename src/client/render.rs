//! What `presup status` prints: the master's STATUS object as tables a person reads at a
//! glance, or as JSON with the memory of each process added (`rss_bytes`, `pss_bytes`), which
//! the CLI reads itself from `/proc/PID/smaps_rollup` (the master never reads `/proc` for a
//! request). Everything here is pure but [`memory`], and works on any STATUS, however
//! incomplete: a missing field is shown as `-`.

use serde_json::{Map, Value};

/// The RSS and PSS of `pid` in bytes, from `/proc/PID/smaps_rollup`; `None` when it cannot be
/// read (gone, another user's, no such file).
pub fn memory(pid: i64) -> Option<(u64, u64)> {
    let m = crate::procstat::Memory::read(i32::try_from(pid).ok()?)?;
    Some((m.rss, m.pss))
}

/// Adds `rss_bytes` and `pss_bytes` (numbers, or null when unknown) to every worker,
/// singleton and stem of `status`, from `read` (given a pid).
pub fn add_memory(status: &mut Value, read: impl Fn(i64) -> Option<(u64, u64)>) {
    for list in ["workers", "singletons", "stems"] {
        let Some(Value::Array(items)) = status.get_mut(list) else { continue };
        for item in items {
            let Value::Object(map) = item else { continue };
            let got = map.get("pid").and_then(Value::as_i64).and_then(&read);
            map.insert("rss_bytes".into(), got.map(|(r, _)| r.into()).unwrap_or(Value::Null));
            map.insert("pss_bytes".into(), got.map(|(_, p)| p.into()).unwrap_or(Value::Null));
        }
    }
}

/// A duration for a person: `0.4s`, `42s`, `5m 3s`, `2h 3m`, `3d 4h`.
pub fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".into();
    }
    if seconds < 10.0 {
        return format!("{seconds:.1}s");
    }
    let s = seconds as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A size for a person: `512 B`, `12.0 KiB`, `41.2 MiB`, `1.3 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Text from a child (its `STATUS=`), made safe for a terminal (no escape sequences, no
/// line breaks) and cut to `max` characters.
pub fn clean(text: &str, max: usize) -> String {
    let mut out: String =
        text.chars().map(|c| if c.is_control() { '?' } else { c }).take(max + 1).collect();
    if out.chars().count() > max {
        out = out.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
    }
    out
}

/// The STATUS object (memory added) as tables, `now` in seconds since the epoch.
pub fn table(status: &Value, now: f64) -> String {
    let mut out = String::new();
    let master = status.get("master").unwrap_or(&Value::Null);
    let int = |v: &Value, k: &str| v.get(k).and_then(Value::as_i64);
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
    let dash = || "-".to_owned();

    // The master.
    let mut head = vec![format!("pid {}", opt(int(master, "pid")))];
    if let Some(v) = text(master, "version") {
        head.push(format!("presup {v}"));
    }
    if let Some(up) = num(master, "uptime_seconds") {
        head.push(format!("up {}", duration(up)));
    }
    if let Some(g) = int(master, "generation") {
        head.push(format!("generation {g}"));
    }
    if let Some(stage) = text(master, "stage") {
        head.push(stage);
    }
    let mut lines = vec![("master", head.join(", "))];
    if let Some(c) = text(master, "config") {
        lines.push(("config", c));
    }
    if let Some(s) = text(master, "status").filter(|s| !s.is_empty()) {
        lines.push(("status", clean(&s, 200)));
    }
    if let Some(r) = status.get("last_reload").filter(|r| !r.is_null()) {
        lines.push(("last reload", last_reload(r, now)));
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in lines {
        out.push_str(&format!("{k:width$}  {v}\n"));
    }

    let memory = |item: &Value| {
        let show = |k: &str| item.get(k).and_then(Value::as_u64).map(bytes).unwrap_or_else(dash);
        [show("rss_bytes"), show("pss_bytes")]
    };
    let exit = |e: Option<&Value>| match e.filter(|e| !e.is_null()) {
        None => dash(),
        Some(e) => {
            let what = text(e, "status").unwrap_or_else(|| "exited".into());
            match num(e, "at_unix") {
                Some(at) => format!("{}, {} ago", clean(&what, 40), duration(now - at)),
                None => clean(&what, 40),
            }
        }
    };
    let status_text = |item: &Value| text(item, "status_text").map(|s| clean(&s, 60));

    // The workers, one row per process (a slot has two during its reload), then the slots of
    // the target that have none (waiting for a restart).
    let workers = list(status, "workers");
    let slots = list(status, "slots");
    let target = int(master, "workers_target").unwrap_or(0);
    if !workers.is_empty() || target > 0 {
        let generation = int(master, "generation");
        let up = workers
            .iter()
            .filter(|w| {
                text(w, "state").as_deref() == Some("up") && int(w, "generation") == generation
            })
            .count();
        out.push_str(&format!("\nworkers: {up} of {target} up\n"));
        let slot_of = |s: i64| slots.iter().find(|x| int(x, "slot") == Some(s));
        let mut rows = vec![header(&[
            "SLOT",
            "PID",
            "GEN",
            "STATE",
            "UPTIME",
            "RESTARTS",
            "LAST EXIT",
            "RSS",
            "PSS",
            "STATUS",
        ])];
        let mut sorted: Vec<&Value> = workers.iter().collect();
        sorted.sort_by_key(|w| (int(w, "slot"), int(w, "generation")));
        let mut covered = std::collections::BTreeSet::new();
        for w in sorted {
            let slot = int(w, "slot");
            covered.insert(slot);
            let s = slot.and_then(slot_of);
            let [rss, pss] = memory(w);
            rows.push(vec![
                opt(slot),
                opt(int(w, "pid")),
                opt(int(w, "generation")),
                text(w, "state").unwrap_or_else(dash),
                num(w, "uptime_seconds").map(duration).unwrap_or_else(dash),
                opt(s.and_then(|s| int(s, "restarts"))),
                exit(s.and_then(|s| s.get("last_exit"))),
                rss,
                pss,
                status_text(w).unwrap_or_else(dash),
            ]);
        }
        for s in slots.iter().filter(|s| int(s, "slot").is_some_and(|n| n < target)) {
            if covered.contains(&int(s, "slot")) {
                continue;
            }
            rows.push(vec![
                opt(int(s, "slot")),
                dash(),
                dash(),
                "down".into(),
                dash(),
                opt(int(s, "restarts")),
                exit(s.get("last_exit")),
                dash(),
                dash(),
                dash(),
            ]);
        }
        out.push_str(&columns(&rows));
    }

    let singletons = list(status, "singletons");
    if !singletons.is_empty() {
        out.push_str("\nsingletons:\n");
        let mut rows = vec![header(&[
            "NAME",
            "PID",
            "STATE",
            "UPTIME",
            "RESTARTS",
            "LAST EXIT",
            "RSS",
            "PSS",
            "STATUS",
        ])];
        for s in singletons {
            let [rss, pss] = memory(s);
            rows.push(vec![
                text(s, "name").map(|n| clean(&n, 40)).unwrap_or_else(dash),
                opt(int(s, "pid")),
                text(s, "state").unwrap_or_else(dash),
                num(s, "uptime_seconds").map(duration).unwrap_or_else(dash),
                opt(int(s, "restarts")),
                exit(s.get("last_exit")),
                rss,
                pss,
                status_text(s).unwrap_or_else(dash),
            ]);
        }
        out.push_str(&columns(&rows));
    }

    let stems = list(status, "stems");
    if !stems.is_empty() {
        out.push_str("\nstems:\n");
        let mut rows =
            vec![header(&["PID", "GEN", "STATE", "UPTIME", "FORKS", "PENDING", "RSS", "PSS"])];
        for s in stems {
            let [rss, pss] = memory(s);
            rows.push(vec![
                opt(int(s, "pid")),
                opt(int(s, "generation")),
                text(s, "state").unwrap_or_else(dash),
                num(s, "uptime_seconds").map(duration).unwrap_or_else(dash),
                opt(int(s, "forks")),
                opt(int(s, "pending")),
                rss,
                pss,
            ]);
        }
        out.push_str(&columns(&rows));
    }

    let hooks = list(status, "hooks");
    if !hooks.is_empty() {
        out.push_str("\nhooks running:\n");
        let mut rows = vec![header(&["POINT", "PID", "FOR", "COMMAND"])];
        for h in hooks {
            rows.push(vec![
                text(h, "point").unwrap_or_else(dash),
                opt(int(h, "pid")),
                num(h, "since_unix").map(|t| duration(now - t)).unwrap_or_else(dash),
                text(h, "command").map(|c| clean(&c, 80)).unwrap_or_else(dash),
            ]);
        }
        out.push_str(&columns(&rows));
    }

    let tickets = list(status, "tickets");
    if !tickets.is_empty() {
        out.push_str("\ntickets:\n");
        let mut rows = vec![header(&["NAME", "INTERVAL", "GRANTS", "DAILY LEFT", "BUCKETS"])];
        for t in tickets {
            let daily = match (int(t, "daily_left"), int(t, "daily_limit")) {
                (Some(left), Some(limit)) => format!("{left} of {limit}"),
                (Some(left), None) => left.to_string(),
                _ => dash(),
            };
            rows.push(vec![
                text(t, "name").unwrap_or_else(dash),
                num(t, "interval_seconds").map(duration).unwrap_or_else(dash),
                opt(int(t, "grants")),
                daily,
                buckets(t.get("buckets")),
            ]);
        }
        out.push_str(&columns(&rows));
    }
    out
}

/// `#3 done: generation 3, 5m ago`, `#4 undone: WHY`, `#5 rejected: E1; E2`.
fn last_reload(r: &Value, now: f64) -> String {
    let id = r.get("id").and_then(Value::as_i64).map(|i| format!("#{i} ")).unwrap_or_default();
    let result = r.get("result").and_then(Value::as_str).unwrap_or("?");
    let mut text = format!("{id}{result}");
    match result {
        "done" | "in_progress" => {
            if let Some(g) = r.get("generation").and_then(Value::as_i64) {
                text.push_str(&format!(": generation {g}"));
            }
        }
        "rejected" => {
            let errors = errors(r);
            if !errors.is_empty() {
                text.push_str(&format!(": {}", clean(&errors, 300)));
            }
        }
        _ => {
            if let Some(why) = r.get("why").and_then(Value::as_str) {
                text.push_str(&format!(": {}", clean(undone_why(why), 300)));
            }
        }
    }
    if let Some(at) = r.get("at_unix").and_then(Value::as_f64) {
        text.push_str(&format!(", {} ago", duration(now - at)));
    }
    text
}

/// An undone reload's `why` without the master's own `reload to generation N undone: `,
/// which the CLI's line says already.
pub fn undone_why(why: &str) -> &str {
    match why.strip_prefix("reload to generation ").and_then(|r| r.split_once(" undone: ")) {
        Some((generation, rest)) if generation.bytes().all(|b| b.is_ascii_digit()) => rest,
        _ => why,
    }
}

/// A rejected reload's errors, joined with `; ` (its `why` when it has none).
pub fn errors(r: &Value) -> String {
    let list: Vec<&str> = r
        .get("errors")
        .and_then(Value::as_array)
        .map(|e| e.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if list.is_empty() {
        return r.get("why").and_then(Value::as_str).unwrap_or("").to_owned();
    }
    list.join("; ")
}

/// A ticket's buckets: `free` when all are, else the busy ones (`3: in 3.2s`), at most 6.
fn buckets(b: Option<&Value>) -> String {
    let Some(b) = b.and_then(Value::as_array) else { return "-".into() };
    let busy: Vec<(i64, f64)> = b
        .iter()
        .filter_map(|x| {
            let n = x.get("bucket")?.as_i64()?;
            let wait = x.get("next_free_in_seconds")?.as_f64()?;
            (wait > 0.0).then_some((n, wait))
        })
        .collect();
    let total = b.len();
    if busy.is_empty() {
        return if total == 1 { "free".into() } else { format!("all {total} free") };
    }
    let mut shown: Vec<String> =
        busy.iter().take(6).map(|(n, w)| format!("{n}: in {}", duration(*w))).collect();
    if busy.len() > 6 {
        shown.push(format!("{} more busy", busy.len() - 6));
    }
    let free = total - busy.len();
    if free > 0 {
        shown.push(format!("{free} free"));
    }
    shown.join(", ")
}

fn list<'a>(status: &'a Value, key: &str) -> &'a [Value] {
    status.get(key).and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn header(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// Rows in aligned columns two spaces apart (the last column not padded), each line indented.
fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| rows.iter().filter_map(|r| r.get(i)).map(|c| c.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::from("  ");
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count() + 2;
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A STATUS's fields for the JSON output: the object itself, pretty-printed.
pub fn json(status: &Value) -> String {
    serde_json::to_string_pretty(status).unwrap_or_else(|_| status.to_string())
}

/// The STATUS object of a `status` answer.
pub fn status_of(answer: &Map<String, Value>) -> Option<&Value> {
    answer.get("status").filter(|s| s.is_object())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: f64 = 1_800_000_000.0;

    fn sample() -> Value {
        json!({
          "master": {"pid": 4242, "version": "0.1.0", "config": "/srv/app/supervisor.toml",
                     "started_unix": NOW - 7400.0, "uptime_seconds": 7400.0, "generation": 3,
                     "stage": "running", "status": "2/3 workers, 1/1 singletons, generation 3",
                     "workers_target": 3, "preload": true, "runtime_dir": "/run/presup/presup-4242-0badcafe"},
          "workers": [
            {"slot": 1, "pid": 4251, "generation": 3, "state": "up", "started_unix": NOW - 302.0,
             "uptime_seconds": 302.0, "status_text": "serving\u{1b}[2J 12 req/s"},
            {"slot": 0, "pid": 4250, "generation": 3, "state": "up", "started_unix": NOW - 7390.0,
             "uptime_seconds": 7390.0, "status_text": null},
          ],
          "slots": [
            {"slot": 0, "restarts": 0, "last_exit": null},
            {"slot": 1, "restarts": 2, "last_exit": {"status": "killed by SIGKILL", "code": null,
                                                    "signal": "SIGKILL", "at_unix": NOW - 303.0}},
            {"slot": 2, "restarts": 5, "last_exit": {"status": "exited with code 1", "code": 1,
                                                    "signal": null, "at_unix": NOW - 1.5}},
          ],
          "singletons": [
            {"name": "scheduler", "pid": 4245, "state": "up", "started_unix": NOW - 7399.0,
             "uptime_seconds": 7399.0, "restarts": 0, "last_exit": null, "status_text": "idle"},
            {"name": "flow", "pid": null, "state": "failed", "started_unix": null,
             "uptime_seconds": null, "restarts": 4, "last_exit": null, "status_text": null}
          ],
          "stems": [{"pid": 4249, "generation": 3, "state": "ready", "uptime_seconds": 7391.0,
                     "forks": 9, "pending": 1}],
          "hooks": [{"point": "worker_exit", "command": "./on-exit.sh", "pid": 4260,
                     "since_unix": NOW - 2.0}],
          "last_reload": {"id": 2, "generation": 3, "result": "done", "why": null, "errors": [],
                          "at_unix": NOW - 600.0},
          "counters": {},
          "tickets": [{"name": "identify", "interval_seconds": 5.0,
                       "buckets": [{"bucket": 0, "next_free_in_seconds": 0.0},
                                   {"bucket": 1, "next_free_in_seconds": 3.2}],
                       "grants": 23, "wait_seconds_total": 1.5, "daily_limit": 1000,
                       "daily_left": 977}],
          "restarts_done": [1]
        })
    }

    #[test]
    fn human_durations_and_sizes() {
        assert_eq!(duration(0.42), "0.4s");
        assert_eq!(duration(9.96), "10.0s");
        assert_eq!(duration(42.9), "42s");
        assert_eq!(duration(303.0), "5m 3s");
        assert_eq!(duration(7400.0), "2h 3m");
        assert_eq!(duration(3.0 * 86_400.0 + 4.0 * 3600.0 + 5.0), "3d 4h");
        assert_eq!(duration(-1.0), "-");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(12 * 1024), "12.0 KiB");
        assert_eq!(bytes(43_201_331), "41.2 MiB");
        assert_eq!(bytes(1_395_864_371), "1.3 GiB");
    }

    #[test]
    fn smaps_rollup_in_bytes() {
        let text = "55d0c0a8e000-7ffd3b9fe000 ---p 00000000 00:00 0   [rollup]\n\
                    Rss:               42188 kB\nPss:               10361 kB\n\
                    Pss_Anon:           6004 kB\nShared_Clean:      31840 kB\n";
        let m = crate::procstat::Memory::parse(text).unwrap();
        assert_eq!((m.rss, m.pss), (42188 * 1024, 10361 * 1024));
        assert_eq!(crate::procstat::Memory::parse("Rss: 1 kB\n"), None);
        // This process's own, for real.
        let (rss, pss) = memory(std::process::id() as i64).expect("own smaps_rollup");
        assert!(rss > 0 && pss > 0 && pss <= rss);
        assert_eq!(memory(999_999_999), None);
    }

    #[test]
    fn memory_is_added_to_every_process_or_null() {
        let mut status = sample();
        add_memory(&mut status, |pid| (pid != 4250).then_some((pid as u64 * 1024, 2048)));
        assert_eq!(status["workers"][0]["rss_bytes"], json!(4251 * 1024));
        assert_eq!(status["workers"][0]["pss_bytes"], json!(2048));
        assert_eq!(status["workers"][1]["rss_bytes"], Value::Null);
        assert_eq!(status["singletons"][1]["pss_bytes"], Value::Null, "no pid");
        assert_eq!(status["stems"][0]["rss_bytes"], json!(4249 * 1024));
        assert!(status["hooks"][0].get("rss_bytes").is_none());
    }

    #[test]
    fn the_table_shows_each_process_at_a_glance() {
        let mut status = sample();
        add_memory(&mut status, |pid| (pid != 4250).then_some((43_201_331 / 1024 * 1024, 6 << 20)));
        let out = table(&status, NOW);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "master       pid 4242, presup 0.1.0, up 2h 3m, generation 3, running"
        );
        assert_eq!(lines[1], "config       /srv/app/supervisor.toml");
        assert_eq!(lines[2], "status       2/3 workers, 1/1 singletons, generation 3");
        assert_eq!(lines[3], "last reload  #2 done: generation 3, 10m 0s ago");
        let at = |needle: &str| {
            lines
                .iter()
                .position(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("{needle}:\n{out}"))
        };
        assert_eq!(lines[at("workers:")], "workers: 2 of 3 up");
        let head = at("SLOT");
        assert_eq!(
            lines[head],
            "  SLOT  PID   GEN  STATE  UPTIME  RESTARTS  LAST EXIT                     RSS       PSS      STATUS"
        );
        // Sorted by slot; the escape sequence a worker sent is not passed to the terminal.
        assert_eq!(lines[head + 1], "  0     4250  3    up     2h 3m   0         -                             -         -        -");
        assert_eq!(lines[head + 2], "  1     4251  3    up     5m 2s   2         killed by SIGKILL, 5m 3s ago  41.2 MiB  6.0 MiB  serving?[2J 12 req/s");
        assert_eq!(lines[head + 3], "  2     -     -    down   -       5         exited with code 1, 1.5s ago  -         -        -");
        assert!(lines[at("flow")].contains("failed"), "{out}");
        assert!(
            lines[at("scheduler")].starts_with("  scheduler  4245  up      2h 3m   0"),
            "{out}"
        );
        assert!(
            lines[at("stems:") + 2].starts_with("  4249  3    ready  2h 3m   9      1"),
            "{out}"
        );
        assert_eq!(lines[at("hooks running:") + 2], "  worker_exit  4260  2.0s  ./on-exit.sh");
        assert_eq!(
            lines[at("identify")],
            "  identify  5.0s      23      977 of 1000  1: in 3.2s, 1 free"
        );
        assert!(!out.contains('\u{1b}'));
    }

    #[test]
    fn a_sparse_status_still_renders() {
        let out = table(&json!({"master": {"pid": 1}}), NOW);
        assert_eq!(out, "master  pid 1\n");
        let undone = json!({"id": 4, "result": "undone", "why": "reload to generation 3 undone: slot 1 exited with code 1 before it was up", "at_unix": NOW - 3.0});
        assert_eq!(
            last_reload(&undone, NOW),
            "#4 undone: slot 1 exited with code 1 before it was up, 3.0s ago"
        );
        let rejected = json!({"id": 5, "result": "rejected", "errors": ["a: line 1", "b: line 2"]});
        assert_eq!(last_reload(&rejected, NOW), "#5 rejected: a: line 1; b: line 2");
    }

    #[test]
    fn undone_says_why_once() {
        assert_eq!(
            undone_why("reload to generation 12 undone: the stem failed"),
            "the stem failed"
        );
        assert_eq!(undone_why("slot 1 exited"), "slot 1 exited");
        assert_eq!(
            undone_why("reload to generation x undone: y"),
            "reload to generation x undone: y"
        );
    }

    #[test]
    fn child_text_is_made_safe_and_short() {
        assert_eq!(clean("ok\nnext\u{7}", 20), "ok?next?");
        assert_eq!(clean("abcdefghij", 5), "abcd…");
        assert_eq!(clean("abcde", 5), "abcde");
    }
}
