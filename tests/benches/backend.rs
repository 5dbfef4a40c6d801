//! Benchmark (prints figures, asserts no timings): the operator's read + diff + apply of 3 fields
//! (callGroup, pickupGroup, role) on 10,000 users against PostgreSQL, next to
//!   (a) the floor: one hand-written batched SQL statement doing the same 30,000 writes, and
//!   (b) what admins do today: Kamailio's `kamctl avp rm` + `kamctl avp add` per field, timed on a
//!       sample and extrapolated to 30,000 fields;
//! then the operator path again on SQLite. Issue "Kamailio backend", part 8; targets in
//! /work/shared/design/targets.md ("PBX write phase within 3x the floor").
//!
//!   cargo bench --bench backend
//!
//! Knobs (environment): BENCH_USERS (10000), BENCH_ROUNDS (3), BENCH_KAMCTL_USERS (34: 34 users x
//! 3 fields = 102 field writes = 204 kamctl calls), BENCH_SQLITE (1; 0 skips the SQLite lab),
//! BENCH_PROFILE (0; 1 turns on PostgreSQL statement logging and auto_explain in the lab, prints
//! after each operator round the server time per statement kind and the plans of statements over
//! 20 ms, and at the end times hand-written alternatives of the read and of the compare-and-set
//! write, to size a change in src/pbx/kamailio/db.rs).
//!
//! Every write run uses values no user holds yet (a fresh "generation"), so each run really
//! changes 3 x users attribute values; every run is checked to have landed (correctness is
//! asserted, timings never are).

#[path = "../support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pbx_operator::pbx::kamailio::{Kamailio, KamailioConfig};
use pbx_operator::pbx::{PbxBackend, UserChange, UserField, UserSelection, WriteOutcome};
use pbx_operator::plan::selection::Selector;
use pbx_operator::plan::users::{FieldIntent, Intent, Wanted, plan};
use sqlx::{AssertSqlSafe, Row};
use support::lab::{Lab, LabSpec};

const FIRST_EXT: usize = 200;
const ROLES: [&str; 3] = ["User", "Operator", "Admin"];
const ATTRS: [&str; 3] = ["pbx.call_group", "pbx.pickup_group", "pbx.role"];

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The values of one write generation; consecutive generations differ in all three fields.
#[derive(Clone, Debug)]
struct Gen {
    call_group: String,
    pickup_group: String,
    role: &'static str,
}

fn generation(g: usize) -> Gen {
    Gen {
        call_group: (100 + g).to_string(),
        pickup_group: (500 + g).to_string(),
        role: ROLES[g % 3],
    }
}

impl Gen {
    /// (attribute, value) in ATTRS order.
    fn values(&self) -> [(&'static str, &str); 3] {
        [
            (ATTRS[0], self.call_group.as_str()),
            (ATTRS[1], self.pickup_group.as_str()),
            (ATTRS[2], self.role),
        ]
    }
}

fn extensions(users: usize) -> Vec<String> {
    (FIRST_EXT..FIRST_EXT + users)
        .map(|e| e.to_string())
        .collect()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------- memory --

fn status_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Peak resident memory per segment: VmHWM is reset (write "5" to /proc/self/clear_refs, Linux
/// >= 4.0) at the start of a segment and read at its end. The process-wide peak is the largest
/// segment peak, since every segment is measured before the next reset.
struct Memory {
    resettable: bool,
    process_peak_kib: u64,
}

impl Memory {
    fn new() -> Memory {
        let mut m = Memory {
            resettable: false,
            process_peak_kib: 0,
        };
        m.process_peak_kib = status_kib("VmHWM:").unwrap_or(0);
        m.resettable = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        m
    }

    /// Starts a segment; returns the resident memory at its start.
    fn start(&mut self) -> u64 {
        let hwm = status_kib("VmHWM:").unwrap_or(0);
        self.process_peak_kib = self.process_peak_kib.max(hwm);
        if self.resettable {
            let _ = std::fs::write("/proc/self/clear_refs", "5");
        }
        status_kib("VmRSS:").unwrap_or(0)
    }

    /// The peak of the segment (the process peak so far if VmHWM cannot be reset).
    fn end(&mut self) -> u64 {
        let hwm = status_kib("VmHWM:").unwrap_or(0);
        self.process_peak_kib = self.process_peak_kib.max(hwm);
        hwm
    }

    fn process_peak(&mut self) -> u64 {
        self.end()
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// -------------------------------------------------------- operator path --

struct OperatorRun {
    read: Duration,
    plan: Duration,
    apply: Duration,
    total: Duration,
    writes: usize,
    rss_before_kib: u64,
    peak_kib: u64,
}

async fn backend(lab: &Lab) -> Kamailio {
    let config = KamailioConfig::new(lab.db_url(), lab.rpc_url(), lab.domain());
    Kamailio::connect(config)
        .await
        .expect("connect the Kamailio backend to the lab")
}

/// read 10k users + plan (diff) + apply_user_changes(atomic = true), each phase timed.
async fn operator_run(pbx: &Kamailio, users: usize, g: &Gen, mem: &mut Memory) -> OperatorRun {
    let rss_before_kib = mem.start();
    let exts = extensions(users);
    let t0 = Instant::now();
    let read = pbx
        .read_users(&UserSelection {
            groups: vec![],
            extensions: exts.clone(),
        })
        .await
        .expect("read_users");
    let t_read = t0.elapsed();
    assert_eq!(read.users.len(), users, "every seeded user is read");

    let t1 = Instant::now();
    let selector = Selector {
        extensions: exts,
        ..Default::default()
    };
    let field = |field: UserField, v: &str| FieldIntent {
        field,
        wanted: Wanted::Value(Some(v.to_string())),
        open: true,
    };
    let intent = Intent {
        fields: vec![
            field(UserField::CallGroup, &g.call_group),
            field(UserField::PickupGroup, &g.pickup_group),
            field(UserField::Role, g.role),
        ],
        actions: vec![],
    };
    let p = plan(&read, &selector, &intent, &UserField::ALL).expect("plan");
    let changes: Vec<UserChange> = p.targets.iter().filter_map(|t| t.change()).collect();
    let t_plan = t1.elapsed();
    let writes: usize = changes.iter().map(|c| c.writes.len()).sum();
    assert_eq!(writes, 3 * users, "every user changes in all 3 fields");

    let t2 = Instant::now();
    let outcomes = pbx
        .apply_user_changes(&changes, true)
        .await
        .expect("apply_user_changes");
    let t_apply = t2.elapsed();
    let total = t0.elapsed();
    let peak_kib = mem.end();
    assert!(
        outcomes.iter().all(|o| *o == WriteOutcome::Applied),
        "every change applied: {:?}",
        outcomes.iter().find(|o| **o != WriteOutcome::Applied)
    );
    OperatorRun {
        read: t_read,
        plan: t_plan,
        apply: t_apply,
        total,
        writes,
        rss_before_kib,
        peak_kib,
    }
}

fn print_operator_header() {
    println!(
        "  {:<6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>13} {:>13}",
        "round", "read s", "plan s", "apply s", "total s", "writes", "RSS before", "peak RSS"
    );
}

fn print_operator_run(label: &str, r: &OperatorRun) {
    println!(
        "  {:<6} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8} {:>9.1} MiB {:>9.1} MiB",
        label,
        secs(r.read),
        secs(r.plan),
        secs(r.apply),
        secs(r.total),
        r.writes,
        mib(r.rss_before_kib),
        mib(r.peak_kib)
    );
}

// ------------------------------------------------------------ the floor --

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FloorForm {
    /// UPDATE ... FROM unnest($1::text[], $2::text[], $3::text[]): per-row values, 3 parameters.
    Unnest,
    /// UPDATE ... FROM (VALUES ('200','pbx.call_group','101'), ... 30,000 tuples) as literal SQL.
    ValuesLiteral,
    /// UPDATE ... SET value = CASE attribute ... WHERE username = ANY($1): only valid because
    /// every user gets the same three values here.
    CaseAny,
}

impl FloorForm {
    const ALL: [FloorForm; 3] = [
        FloorForm::Unnest,
        FloorForm::ValuesLiteral,
        FloorForm::CaseAny,
    ];
    fn name(self) -> &'static str {
        match self {
            FloorForm::Unnest => "UPDATE .. FROM unnest(3 text[] params)",
            FloorForm::ValuesLiteral => "UPDATE .. FROM (VALUES 30k tuples literal)",
            FloorForm::CaseAny => "UPDATE .. SET CASE attribute .. = ANY($1)",
        }
    }
}

fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// One statement, one implicit transaction, the same 3 x users writes the operator makes.
async fn floor_pg(
    pool: &sqlx::PgPool,
    domain: &str,
    users: usize,
    g: &Gen,
    form: FloorForm,
) -> (Duration, u64) {
    let t0 = Instant::now();
    let exts = extensions(users);
    let result = match form {
        FloorForm::Unnest => {
            let mut usernames = Vec::with_capacity(3 * users);
            let mut attributes = Vec::with_capacity(3 * users);
            let mut values = Vec::with_capacity(3 * users);
            for e in &exts {
                for (a, v) in g.values() {
                    usernames.push(e.clone());
                    attributes.push(a.to_string());
                    values.push(v.to_string());
                }
            }
            sqlx::query(
                "UPDATE usr_preferences u SET value = v.value, last_modified = now() \
                 FROM unnest($2::text[], $3::text[], $4::text[]) AS v(username, attribute, value) \
                 WHERE u.domain = $1 AND u.username = v.username AND u.attribute = v.attribute",
            )
            .bind(domain)
            .bind(usernames)
            .bind(attributes)
            .bind(values)
            .execute(pool)
            .await
        }
        FloorForm::ValuesLiteral => {
            let mut q = String::with_capacity(40 * 3 * users + 300);
            q.push_str(
                "UPDATE usr_preferences u SET value = v.value, last_modified = now() FROM (VALUES ",
            );
            let mut first = true;
            for e in &exts {
                for (a, v) in g.values() {
                    if !first {
                        q.push(',');
                    }
                    first = false;
                    q.push_str(&format!(
                        "({},{},{})",
                        sql_literal(e),
                        sql_literal(a),
                        sql_literal(v)
                    ));
                }
            }
            q.push_str(&format!(
                ") AS v(username, attribute, value) WHERE u.domain = {} \
                 AND u.username = v.username AND u.attribute = v.attribute",
                sql_literal(domain)
            ));
            sqlx::raw_sql(AssertSqlSafe(q)).execute(pool).await
        }
        FloorForm::CaseAny => {
            sqlx::query(
                "UPDATE usr_preferences SET value = CASE attribute \
                 WHEN 'pbx.call_group' THEN $2 WHEN 'pbx.pickup_group' THEN $3 ELSE $4 END, \
                 last_modified = now() \
                 WHERE domain = $1 AND username = ANY($5) \
                 AND attribute IN ('pbx.call_group', 'pbx.pickup_group', 'pbx.role')",
            )
            .bind(domain)
            .bind(&g.call_group)
            .bind(&g.pickup_group)
            .bind(g.role)
            .bind(exts)
            .execute(pool)
            .await
        }
    }
    .expect("the floor statement");
    (t0.elapsed(), result.rows_affected())
}

/// Rows holding generation `g`'s value, per attribute, among all users.
async fn count_landed_pg(pool: &sqlx::PgPool, domain: &str, g: &Gen) -> [i64; 3] {
    let mut out = [0; 3];
    for (i, (a, v)) in g.values().into_iter().enumerate() {
        out[i] = sqlx::query(
            "SELECT COUNT(*) FROM usr_preferences WHERE domain = $1 AND attribute = $2 AND value = $3",
        )
        .bind(domain)
        .bind(a)
        .bind(v)
        .fetch_one(pool)
        .await
        .unwrap()
        .get(0);
    }
    out
}

// ---------------------------------------------------------------- kamctl --

struct KamctlSample {
    fields: usize,
    rm: Vec<Duration>,
    add: Vec<Duration>,
    wall: Duration,
}

/// A kamctlrc pointing at the lab's PostgreSQL, in its own directory (kamctl reads ./kamctlrc
/// when KAMCTL_TEST is set; nothing in /etc or $HOME is touched).
fn kamctl_dir(lab: &Lab) -> (std::path::PathBuf, String) {
    let url = lab.db_url();
    let rest = url
        .strip_prefix("postgres://")
        .expect("postgres URL in lab.env");
    let (cred, host) = rest.split_once('@').expect("user:password@host");
    let (user, password) = cred.split_once(':').expect("user:password");
    let (hostport, dbname) = host.split_once('/').expect("host:port/db");
    let (dbhost, dbport) = hostport.split_once(':').expect("host:port");
    let dir = lab.dir.join("kamctl");
    std::fs::create_dir_all(&dir).unwrap();
    let rc = format!(
        "# written by tests/benches/backend.rs\n\
         SIP_DOMAIN={domain}\n\
         DBENGINE=PGSQL\n\
         DBHOST={dbhost}\n\
         DBPORT={dbport}\n\
         DBNAME={dbname}\n\
         DBRWUSER={user}\n\
         DBRWPW=\"{password}\"\n\
         DBROUSER={user}\n\
         DBROPW=\"{password}\"\n\
         VERBOSE=0\n",
        domain = lab.domain()
    );
    std::fs::write(dir.join("kamctlrc"), rc).unwrap();
    (dir, password.to_string())
}

fn kamctl(dir: &Path, password: &str, args: &[&str]) -> Duration {
    let t0 = Instant::now();
    let out = Command::new("kamctl")
        .args(args)
        .current_dir(dir)
        .env("KAMCTL_TEST", "1")
        .env("PGPASSWORD", password)
        .output()
        .expect("running kamctl (apt-get install kamailio)");
    let d = t0.elapsed();
    assert!(
        out.status.success(),
        "kamctl {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    d
}

/// Like an admin's shell loop: per user, per field, `kamctl avp rm` the old value and
/// `kamctl avp add` the new one (`avp add` alone inserts a second row and keeps the old one).
fn kamctl_sample(lab: &Lab, sample: &[String], g: &Gen) -> KamctlSample {
    let (dir, password) = kamctl_dir(lab);
    let mut rm = Vec::new();
    let mut add = Vec::new();
    let t0 = Instant::now();
    for ext in sample {
        let aor = format!("{ext}@{}", lab.domain());
        for (a, v) in g.values() {
            rm.push(kamctl(&dir, &password, &["avp", "rm", "-u", &aor, "-a", a]));
            add.push(kamctl(&dir, &password, &["avp", "add", &aor, a, "2", v]));
        }
    }
    KamctlSample {
        fields: sample.len() * 3,
        rm,
        add,
        wall: t0.elapsed(),
    }
}

// ----------------------------------------------------------------- SQLite --

/// SQLite's fastest single statement we found: UPDATE .. FROM json_each(one bound JSON array of
/// [username, attribute, value]), which probes usr_preferences_uda_idx per element. (A 30k-tuple
/// `WITH v AS (VALUES ..) UPDATE .. FROM v` took 24-32 s with the SQLite sqlx bundles: no index
/// on the join.)
async fn floor_sqlite(
    pool: &sqlx::SqlitePool,
    domain: &str,
    users: usize,
    g: &Gen,
) -> (Duration, u64) {
    let t0 = Instant::now();
    let exts = extensions(users);
    let mut rows: Vec<[&str; 3]> = Vec::with_capacity(3 * users);
    for e in &exts {
        for (a, v) in g.values() {
            rows.push([e.as_str(), a, v]);
        }
    }
    let json = serde_json::to_string(&rows).unwrap();
    let r = sqlx::query(
        "UPDATE usr_preferences SET value = json_extract(j.value, '$[2]'), \
         last_modified = CURRENT_TIMESTAMP FROM json_each($2) AS j \
         WHERE usr_preferences.domain = $1 \
         AND usr_preferences.username = json_extract(j.value, '$[0]') \
         AND usr_preferences.attribute = json_extract(j.value, '$[1]')",
    )
    .bind(domain)
    .bind(json)
    .execute(pool)
    .await
    .expect("the SQLite floor statement");
    (t0.elapsed(), r.rows_affected())
}

async fn count_landed_sqlite(pool: &sqlx::SqlitePool, domain: &str, g: &Gen) -> [i64; 3] {
    let mut out = [0; 3];
    for (i, (a, v)) in g.values().into_iter().enumerate() {
        out[i] = sqlx::query(
            "SELECT COUNT(*) FROM usr_preferences WHERE domain = $1 AND attribute = $2 AND value = $3",
        )
        .bind(domain)
        .bind(a)
        .bind(v)
        .fetch_one(pool)
        .await
        .unwrap()
        .get(0);
    }
    out
}

// --------------------------------------------------------------- profile --

/// A statement as logged, with placeholder runs and the rows of multi-row INSERTs collapsed.
fn statement_kind(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            while chars.peek().is_some_and(char::is_ascii_digit) {
                chars.next();
            }
            out.push('n');
        }
    }
    while out.contains("$n, $n") {
        out = out.replace("$n, $n", "$n");
    }
    if let Some(i) = out.find("), (") {
        out.truncate(i + 1);
        out.push_str(", ...");
    }
    out.chars().take(110).collect()
}

/// BENCH_PROFILE=1: PostgreSQL statement logging (`log_min_duration_statement = 0`) and
/// auto_explain (plans of statements over 20 ms) for every session opened after `enable`; after
/// each operator round, the server time per statement kind and phase (parse/bind/execute) and
/// the plans of the slow statements, next to the client's phase times.
struct PgProfile {
    admin: sqlx::PgPool,
    log: std::path::PathBuf,
}

impl PgProfile {
    async fn enable(lab: &Lab) -> PgProfile {
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(lab.get("LAB_PG_ADMIN_URL"))
            .await
            .expect("connect as the lab's PostgreSQL superuser");
        let mut conn = admin.acquire().await.unwrap();
        // auto_explain must be loaded in this session before ALTER SYSTEM accepts its settings.
        for q in [
            "LOAD 'auto_explain'",
            "ALTER SYSTEM SET log_min_duration_statement = 0",
            "ALTER SYSTEM SET log_parameter_max_length = 0",
            "ALTER SYSTEM SET session_preload_libraries = 'auto_explain'",
            "ALTER SYSTEM SET auto_explain.log_min_duration = '20ms'",
            "ALTER SYSTEM SET log_autovacuum_min_duration = 0",
            "SELECT pg_reload_conf()",
        ] {
            sqlx::query(q).execute(&mut *conn).await.unwrap();
        }
        drop(conn);
        tokio::time::sleep(Duration::from_millis(300)).await;
        PgProfile {
            admin,
            log: lab.dir.join("logs/postgres.log"),
        }
    }

    fn offset(&self) -> u64 {
        std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    /// Prints what the server logged since `from` for an operator run.
    fn report(&self, from: u64, r: &OperatorRun) {
        use std::collections::BTreeMap;
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes[(from as usize).min(bytes.len())..]).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        // kind -> phase -> (count, ms)
        let mut kinds: BTreeMap<String, BTreeMap<String, (usize, f64)>> = BTreeMap::new();
        // (kind, plan shape) -> (count, ms)
        let mut plans: BTreeMap<(String, String), (usize, f64)> = BTreeMap::new();
        let mut total_ms = 0.0;
        let mut autovacuum = Vec::new();
        for (n, line) in lines.iter().enumerate() {
            if line.contains("automatic vacuum") || line.contains("automatic analyze") {
                autovacuum.push(
                    line.split("LOG:")
                        .nth(1)
                        .unwrap_or(line)
                        .trim()
                        .chars()
                        .take(80)
                        .collect::<String>(),
                );
            }
            let Some(i) = line.find("duration: ") else {
                continue;
            };
            let rest = &line[i + "duration: ".len()..];
            let Some((ms, rest)) = rest.split_once(" ms") else {
                continue;
            };
            let Ok(ms) = ms.trim().parse::<f64>() else {
                continue;
            };
            let rest = rest.trim_start();
            if rest == "plan:" {
                // auto_explain: tab-indented "Query Text: .." and plan lines follow.
                let body: Vec<&str> = lines[n + 1..]
                    .iter()
                    .take_while(|l| l.starts_with('\t') || l.starts_with(' '))
                    .map(|l| l.trim())
                    .collect();
                let kind = body
                    .iter()
                    .find_map(|l| l.strip_prefix("Query Text: "))
                    .map(statement_kind)
                    .unwrap_or_default();
                let shape = body
                    .iter()
                    .filter(|l| {
                        !l.starts_with("Query Text")
                            && !l.contains("Cond:")
                            && !l.starts_with("Filter")
                    })
                    .map(|l| {
                        l.split("  (cost")
                            .next()
                            .unwrap_or(l)
                            .trim_start_matches("->  ")
                    })
                    .collect::<Vec<_>>()
                    .join(" / ");
                let e = plans.entry((kind, shape)).or_insert((0, 0.0));
                e.0 += 1;
                e.1 += ms;
                continue;
            }
            let (phase, sql) = match rest.split_once(": ") {
                Some((head, sql)) => (
                    head.split_whitespace().next().unwrap_or("?").to_string(),
                    sql,
                ),
                None => ("?".to_string(), rest),
            };
            total_ms += ms;
            let e = kinds
                .entry(statement_kind(sql))
                .or_default()
                .entry(phase)
                .or_insert((0, 0.0));
            e.0 += 1;
            e.1 += ms;
        }
        println!(
            "         server time of all statements {:.3} s of the round's {:.3} s (the rest: client, driver, round trips)",
            total_ms / 1e3,
            secs(r.total)
        );
        let mut rows: Vec<(f64, String)> = kinds
            .into_iter()
            .map(|(kind, phases)| {
                let ms: f64 = phases.values().map(|(_, ms)| ms).sum();
                let detail = phases
                    .iter()
                    .map(|(p, (n, ms))| format!("{p} {n}x {ms:.0} ms"))
                    .collect::<Vec<_>>()
                    .join(", ");
                (ms, format!("{ms:>7.0} ms  {kind} [{detail}]"))
            })
            .collect();
        rows.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
        for (_, line) in rows.iter().filter(|(ms, _)| *ms >= 1.0).take(8) {
            println!("         {line}");
        }
        let mut plans: Vec<_> = plans.into_iter().collect();
        plans.sort_by(|a, b| b.1.1.partial_cmp(&a.1.1).unwrap());
        for ((kind, shape), (n, ms)) in plans.iter().take(4) {
            println!(
                "         over 20 ms: {n}x, {ms:.0} ms: {}\n             plan: {shape}",
                kind.chars().take(60).collect::<String>()
            );
        }
        if !autovacuum.is_empty() {
            println!(
                "         autovacuum during the round: {}",
                autovacuum.join("; ")
            );
        }
    }

    async fn disable(self) {
        for q in [
            "ALTER SYSTEM RESET log_min_duration_statement",
            "ALTER SYSTEM RESET log_parameter_max_length",
            "ALTER SYSTEM RESET session_preload_libraries",
            "ALTER SYSTEM RESET auto_explain.log_min_duration",
            "ALTER SYSTEM RESET log_autovacuum_min_duration",
            "SELECT pg_reload_conf()",
        ] {
            sqlx::query(q).execute(&self.admin).await.unwrap();
        }
        self.admin.close().await;
    }
}

/// BENCH_PROFILE=1: hand-written forms of the operator's two database phases, to size what a
/// change in src/pbx/kamailio/db.rs could gain: the read as 4 statements with one array
/// parameter each (`username = ANY($2)`) instead of 20 chunks x 4 statements x 500 parameters,
/// and the compare-and-set write as one UPDATE .. FROM unnest(username, attribute, old, new)
/// WHERE value = old RETURNING (a missing returned row is a conflict), in one transaction.
async fn alternatives_pg(
    pool: &sqlx::PgPool,
    domain: &str,
    users: usize,
    old: &Gen,
    new: &Gen,
) -> (Duration, usize, Duration, usize) {
    let exts = extensions(users);
    let t0 = Instant::now();
    let mut rows = 0;
    for q in [
        "SELECT username, ha1 FROM subscriber WHERE domain = $1 AND username = ANY($2)",
        "SELECT username, attribute, value FROM usr_preferences WHERE domain = $1 AND username = ANY($2) AND attribute LIKE 'pbx.%'",
        "SELECT username, grp FROM grp WHERE domain = $1 AND username = ANY($2) ORDER BY grp",
        "SELECT username, alias_username FROM dbaliases WHERE domain = $1 AND username = ANY($2) ORDER BY id",
    ] {
        let got = sqlx::query(q)
            .bind(domain)
            .bind(&exts)
            .fetch_all(pool)
            .await
            .unwrap();
        for r in &got {
            let _: (String, String) = (r.get(0), r.get(1));
        }
        rows += got.len();
    }
    let read = t0.elapsed();

    let t1 = Instant::now();
    let (mut u, mut a, mut o, mut n) = (vec![], vec![], vec![], vec![]);
    for e in &exts {
        for ((attr, old), (_, new)) in old.values().into_iter().zip(new.values()) {
            u.push(e.clone());
            a.push(attr.to_string());
            o.push(old.to_string());
            n.push(new.to_string());
        }
    }
    let mut tx = pool.begin().await.unwrap();
    let applied = sqlx::query(
        "UPDATE usr_preferences p SET value = v.new, last_modified = now() \
         FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) AS v(username, attribute, old, new) \
         WHERE p.domain = $1 AND p.username = v.username AND p.attribute = v.attribute AND p.value = v.old \
         RETURNING p.username, p.attribute",
    )
    .bind(domain)
    .bind(u)
    .bind(a)
    .bind(o)
    .bind(n)
    .fetch_all(&mut *tx)
    .await
    .unwrap()
    .len();
    tx.commit().await.unwrap();
    (read, rows, t1.elapsed(), applied)
}

// ------------------------------------------------------------------- main --

fn start_lab(db: &'static str, users: usize) -> (Lab, f64) {
    let t0 = Instant::now();
    let lab = Lab::start(LabSpec {
        db,
        users,
        phones: 0,
        ..Default::default()
    });
    (lab, secs(t0.elapsed()))
}

/// The 1, 5 and 15 minute load averages: other work on this machine skews every figure.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn tool_version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|| "?".into())
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; a filter argument other than "backend" skips this bench.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if !filter.is_empty() && !filter.iter().any(|f| "backend".contains(f.as_str())) {
        return;
    }
    let users = env_usize("BENCH_USERS", 10_000);
    let rounds = env_usize("BENCH_ROUNDS", 3).max(1);
    let kamctl_users = env_usize("BENCH_KAMCTL_USERS", 34).clamp(1, users);
    let with_sqlite = env_usize("BENCH_SQLITE", 1) != 0;
    let writes = 3 * users;
    let mut mem = Memory::new();

    println!();
    println!(
        "== backend benchmark: read + diff + apply of 3 fields (callGroup, pickupGroup, role) on {users} users = {writes} writes =="
    );
    println!(
        "   machine: {} cores; {}; {}; {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        tool_version("kamailio", &["-v"]),
        tool_version("psql", &["--version"]),
        tool_version("kamctl", &["version"])
    );
    println!(
        "   {rounds} rounds; each write run sets values no user holds yet, checked to land afterwards; load average at start {}",
        loadavg()
    );

    // ------------------------------------------------------------ PostgreSQL
    let (lab, up_s) = start_lab("postgres", users);
    println!(
        "\n-- PostgreSQL lab: {users} users, up in {up_s:.1} s (lab PostgreSQL runs with fsync=off) --"
    );
    let domain = lab.domain().to_string();
    let profile = if env_usize("BENCH_PROFILE", 0) != 0 {
        Some(PgProfile::enable(&lab).await)
    } else {
        None
    };
    let pbx = backend(&lab).await;
    let pg = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(lab.db_url())
        .await
        .expect("connect to the lab's PostgreSQL");

    // Generation 0: a uniform start (untimed), so every later generation differs for every user.
    let mut gen_no = 0;
    let (_, n) = floor_pg(&pg, &domain, users, &generation(gen_no), FloorForm::Unnest).await;
    assert_eq!(n as usize, writes, "every user has the 3 attribute rows");

    let mut op_runs: Vec<OperatorRun> = Vec::new();
    let mut floor_runs: Vec<(FloorForm, f64, u64)> = Vec::new();
    let mut floor_peak_kib = 0;
    for round in 1..=rounds {
        gen_no += 1;
        let g = generation(gen_no);
        let log_from = profile.as_ref().map(PgProfile::offset);
        let r = operator_run(&pbx, users, &g, &mut mem).await;
        assert_eq!(
            count_landed_pg(&pg, &domain, &g).await,
            [users as i64; 3],
            "the operator's writes landed"
        );
        if round == 1 {
            println!("\noperator path (read_users, plan, apply_user_changes atomic=true):");
            print_operator_header();
        }
        print_operator_run(&round.to_string(), &r);
        if let (Some(p), Some(from)) = (&profile, log_from) {
            p.report(from, &r);
        }
        op_runs.push(r);
        for form in FloorForm::ALL {
            gen_no += 1;
            let g = generation(gen_no);
            mem.start();
            let (d, rows) = floor_pg(&pg, &domain, users, &g, form).await;
            floor_peak_kib = floor_peak_kib.max(mem.end());
            assert_eq!(rows as usize, writes, "{form:?} updated every row");
            assert_eq!(
                count_landed_pg(&pg, &domain, &g).await,
                [users as i64; 3],
                "{form:?}: the floor's writes landed"
            );
            floor_runs.push((form, secs(d), rows));
        }
    }
    println!(
        "\nfloor candidates (one statement each, sqlx on an open connection), seconds per round:"
    );
    let mut best: Option<(FloorForm, f64)> = None;
    for form in FloorForm::ALL {
        let times: Vec<f64> = floor_runs
            .iter()
            .filter(|(f, _, _)| *f == form)
            .map(|(_, t, _)| *t)
            .collect();
        let m = median(&times);
        println!(
            "  {:<44} {}   median {:.3} s",
            form.name(),
            times
                .iter()
                .map(|t| format!("{t:.3}"))
                .collect::<Vec<_>>()
                .join(" "),
            m
        );
        if best.is_none_or(|(_, b)| m < b) {
            best = Some((form, m));
        }
    }
    let (floor_form, floor_s) = best.unwrap();
    let unnest_s = median(
        &floor_runs
            .iter()
            .filter(|(f, _, _)| *f == FloorForm::Unnest)
            .map(|(_, t, _)| *t)
            .collect::<Vec<_>>(),
    );
    if let Some(p) = profile {
        p.disable().await;
        gen_no += 1;
        let (read, rows, write, applied) = alternatives_pg(
            &pg,
            &domain,
            users,
            &generation(gen_no - 1),
            &generation(gen_no),
        )
        .await;
        assert_eq!(
            applied, writes,
            "the compare-and-set UPDATE wrote every field"
        );
        assert_eq!(
            count_landed_pg(&pg, &domain, &generation(gen_no)).await,
            [users as i64; 3]
        );
        println!(
            "
PROFILE, hand-written alternatives of the operator's phases (sizes a change in src/pbx/kamailio/db.rs):"
        );
        println!(
            "  read: 4 statements, `username = ANY($2)` with one {users}-element array each: {:.3} s ({rows} rows) vs the operator's read median {:.3} s",
            secs(read),
            median(&op_runs.iter().map(|r| secs(r.read)).collect::<Vec<_>>())
        );
        println!(
            "  compare-and-set write: one UPDATE .. FROM unnest(username, attribute, old, new) WHERE value = old RETURNING, in a transaction: {:.3} s ({applied} rows) vs the operator's apply median {:.3} s",
            secs(write),
            median(&op_runs.iter().map(|r| secs(r.apply)).collect::<Vec<_>>())
        );
    }

    // kamctl sample, spread over the extension range.
    gen_no += 1;
    let g = generation(gen_no);
    let step = (users / kamctl_users).max(1);
    let sample: Vec<String> = (0..kamctl_users)
        .map(|i| (FIRST_EXT + i * step).to_string())
        .collect();
    let k = kamctl_sample(&lab, &sample, &g);
    for ext in &sample {
        for (a, v) in g.values() {
            let rows: Vec<String> = sqlx::query(
                "SELECT value FROM usr_preferences WHERE domain = $1 AND username = $2 AND attribute = $3",
            )
            .bind(&domain)
            .bind(ext)
            .bind(a)
            .fetch_all(&pg)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
            assert_eq!(
                rows,
                [v.to_string()],
                "kamctl's write of {a} for {ext} landed, once"
            );
        }
    }
    let mean = |v: &[Duration]| v.iter().map(|d| secs(*d)).sum::<f64>() / v.len() as f64;
    let (rm_mean, add_mean) = (mean(&k.rm), mean(&k.add));
    let per_field = secs(k.wall) / k.fields as f64;
    let kamctl_s = per_field * writes as f64;
    let add_only_s = add_mean * writes as f64;
    println!(
        "\nkamctl sample: {} users x 3 fields = {} field writes = {} kamctl calls in {:.1} s, all verified in SQL",
        sample.len(),
        k.fields,
        k.rm.len() + k.add.len(),
        secs(k.wall)
    );
    println!(
        "  per call: avp rm {:.0} ms (median {:.0}), avp add {:.0} ms (median {:.0}); per field (rm + add) {:.0} ms",
        rm_mean * 1e3,
        median(&k.rm.iter().map(|d| secs(*d)).collect::<Vec<_>>()) * 1e3,
        add_mean * 1e3,
        median(&k.add.iter().map(|d| secs(*d)).collect::<Vec<_>>()) * 1e3,
        per_field * 1e3
    );
    println!(
        "  EXTRAPOLATED to {writes} field writes from {} calls: {:.0} s ({:.1} min); `avp add` alone (targets.md's method, leaves the old row): {:.0} s ({:.1} min)",
        k.rm.len() + k.add.len(),
        kamctl_s,
        kamctl_s / 60.0,
        add_only_s,
        add_only_s / 60.0
    );

    let op_total = median(&op_runs.iter().map(|r| secs(r.total)).collect::<Vec<_>>());
    let op_read = median(&op_runs.iter().map(|r| secs(r.read)).collect::<Vec<_>>());
    let op_plan = median(&op_runs.iter().map(|r| secs(r.plan)).collect::<Vec<_>>());
    let op_apply = median(&op_runs.iter().map(|r| secs(r.apply)).collect::<Vec<_>>());
    let op_totals = op_runs
        .iter()
        .map(|r| format!("{:.2}", secs(r.total)))
        .collect::<Vec<_>>()
        .join(" / ");
    let op_peak = op_runs.iter().map(|r| r.peak_kib).max().unwrap_or(0);
    let op_before = op_runs.iter().map(|r| r.rss_before_kib).min().unwrap_or(0);
    drop(pbx);
    pg.close().await;
    drop(lab);

    // ------------------------------------------------------------------ SQLite
    let mut sqlite_lines = Vec::new();
    if with_sqlite {
        let (lab, up_s) = start_lab("sqlite", users);
        let pbx = backend(&lab).await;
        let domain = lab.domain().to_string();
        let sq = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect(lab.db_url())
            .await
            .expect("open the lab's SQLite database");
        println!("\n-- SQLite lab: {users} users, up in {up_s:.1} s (WAL) --");
        let mut gen_no = 0;
        let (_, n) = floor_sqlite(&sq, &domain, users, &generation(gen_no)).await;
        assert_eq!(n as usize, writes);
        println!("operator path on SQLite (read_users, plan, apply_user_changes atomic=true):");
        print_operator_header();
        let mut runs = Vec::new();
        let mut floors = Vec::new();
        for round in 1..=rounds {
            gen_no += 1;
            let g = generation(gen_no);
            let r = operator_run(&pbx, users, &g, &mut mem).await;
            assert_eq!(
                count_landed_sqlite(&sq, &domain, &g).await,
                [users as i64; 3]
            );
            print_operator_run(&round.to_string(), &r);
            runs.push(r);
            gen_no += 1;
            let g = generation(gen_no);
            let (d, rows) = floor_sqlite(&sq, &domain, users, &g).await;
            assert_eq!(rows as usize, writes);
            assert_eq!(
                count_landed_sqlite(&sq, &domain, &g).await,
                [users as i64; 3]
            );
            floors.push(secs(d));
        }
        let total = median(&runs.iter().map(|r| secs(r.total)).collect::<Vec<_>>());
        let apply = median(&runs.iter().map(|r| secs(r.apply)).collect::<Vec<_>>());
        let floor = median(&floors);
        println!(
            "SQLite reference floor (UPDATE .. FROM json_each(1 JSON param)): {}   median {:.3} s",
            floors
                .iter()
                .map(|t| format!("{t:.3}"))
                .collect::<Vec<_>>()
                .join(" "),
            floor
        );
        sqlite_lines.push(format!(
            "| SQLite: operator read + diff + apply              | {total:>9.3} | apply alone {apply:.3} s; SQLite one-statement floor {floor:.3} s (operator/floor {:.1}x) |",
            total / floor
        ));
        drop(pbx);
        sq.close().await;
        drop(lab);
    }

    // ----------------------------------------------------------------- summary
    let process_peak = mem.process_peak();
    println!(
        "\n== SUMMARY: {users} users x 3 fields = {writes} writes, PostgreSQL (medians of {rounds} rounds) =="
    );
    println!("| what                                              |  time (s) | notes |");
    println!("|---------------------------------------------------|-----------|-------|");
    println!(
        "| operator: read + diff + apply (atomic)            | {op_total:>9.3} | read {op_read:.3} + plan {op_plan:.3} + apply {op_apply:.3}; per round total {} |",
        op_totals
    );
    println!(
        "| floor: one batched SQL statement                  | {floor_s:>9.3} | fastest form: {}; per-row form (unnest) {unnest_s:.3} s |",
        floor_form.name()
    );
    println!(
        "| kamctl avp rm + add per field (EXTRAPOLATED)      | {kamctl_s:>9.1} | from {} calls on {} fields x {writes}/{} ({:.1} min) |",
        k.rm.len() + k.add.len(),
        k.fields,
        k.fields,
        kamctl_s / 60.0
    );
    for l in &sqlite_lines {
        println!("{l}");
    }
    println!();
    println!(
        "ratio operator / floor          = {:>7.2}x   (whole path: read + diff + apply)",
        op_total / floor_s
    );
    println!(
        "ratio operator apply / floor    = {:>7.2}x   (PBX write phase alone; target: within 3x)",
        op_apply / floor_s
    );
    println!(
        "ratio kamctl / operator         = {:>7.0}x   (kamctl extrapolated)",
        kamctl_s / op_total
    );
    println!();
    if mem.resettable {
        println!(
            "peak memory (VmHWM): operator path {:.1} MiB (RSS {:.1} MiB just before it; includes the benchmark's own data: \
             the 10k-extension lists, the UserRead and the plan it builds and times); floor statement segment {:.1} MiB; \
             whole benchmark process {:.1} MiB",
            mib(op_peak),
            mib(op_before),
            mib(floor_peak_kib),
            mib(process_peak)
        );
    } else {
        println!(
            "peak memory (VmHWM, could not be reset per segment): whole benchmark process {:.1} MiB, \
             including the benchmark's own data",
            mib(process_peak)
        );
    }
    println!(
        "(kamctl's memory is in its own sh/psql processes, not in this figure; lab processes are not counted.)"
    );
    println!("load average at the end: {}", loadavg());
}
