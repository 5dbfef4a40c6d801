//! The Kamailio backend against a real Kamailio, on each database it supports (PostgreSQL, SQLite,
//! MySQL/MariaDB), and SIPp phones. Each scenario is one `async fn(db)`; `on_every_database!`
//! turns it into one test per database, named `<scenario>::<database>`.

mod support;

/// One `#[tokio::test]` per database for each scenario: `cargo test --test kamailio_backend mysql`
/// runs every scenario on MySQL, `... numbers_move` one scenario on all three.
macro_rules! on_every_database {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test]
            async fn postgres() {
                super::$scenario("postgres").await
            }
            #[tokio::test]
            async fn sqlite() {
                super::$scenario("sqlite").await
            }
            #[tokio::test]
            async fn mysql() {
                super::$scenario("mysql").await
            }
        }
    )*};
}

/// The same for the databases that run as a server of their own (outages, logins).
macro_rules! on_database_servers {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test]
            async fn postgres() {
                super::$scenario("postgres").await
            }
            #[tokio::test]
            async fn mysql() {
                super::$scenario("mysql").await
            }
        }
    )*};
}

on_database_servers!(an_outage_is_reported_and_the_backend_recovers);

on_every_database!(
    bulk_read_and_atomic_write,
    a_write_lands_whether_a_user_has_no_row_one_or_two,
    a_write_of_many_chunks_gives_each_user_its_own_outcome,
    conflicts_and_literal_values,
    locked_users_are_refused_at_register,
    notify_reboots_a_phone_and_a_silent_one_does_not_block_others,
    header_injection_through_a_contact_is_refused,
    connection_errors_say_what_to_fix,
    numbers_move_only_from_the_named_holder,
    phones_are_read_and_changed_with_compare_and_set,
    catalogue_export_and_reset,
    a_snapshot_brings_a_removed_user_back_and_names_what_others_hold_now,
);

use std::time::{Duration, Instant};

use pbx_operator::pbx::kamailio::{Kamailio, KamailioConfig};
use pbx_operator::pbx::{
    ActionOutcome, FieldWrite, NewValue, PbxBackend, PhoneField, UserAction, UserChange, UserField,
    UserSelection, WriteOutcome,
};
use sqlx::{AnyPool, AssertSqlSafe, Row};
use support::lab::{Lab, LabSpec};

async fn backend(lab: &Lab) -> Kamailio {
    let mut config = KamailioConfig::new(lab.db_url(), lab.rpc_url(), lab.domain());
    config.notify_timeout = Duration::from_secs(15);
    Kamailio::connect(config).await.expect("connect to the lab")
}

async fn sql_pool(lab: &Lab) -> AnyPool {
    sqlx::any::install_default_drivers();
    AnyPool::connect(lab.db_url()).await.unwrap()
}

async fn attribute(pool: &AnyPool, ext: &str, attribute: &str) -> Option<String> {
    let q = format!(
        "SELECT value FROM usr_preferences WHERE username = '{ext}' AND attribute = '{attribute}'"
    );
    sqlx::query(AssertSqlSafe(q))
        .fetch_optional(pool)
        .await
        .unwrap()
        .map(|r| r.get::<String, _>(0))
}

fn all(n: usize) -> UserSelection {
    UserSelection {
        groups: vec![],
        extensions: (200..200 + n).map(|e| e.to_string()).collect(),
    }
}

async fn bulk_read_and_atomic_write(db: &'static str) {
    let lab = Lab::start(LabSpec {
        db,
        users: 1000,
        phones: 0,
        ..Default::default()
    });
    let pbx = backend(&lab).await;

    let start = Instant::now();
    let read = pbx.read_users(&all(1000)).await.unwrap();
    eprintln!("{db}: read 1000 users in {:?}", start.elapsed());
    assert_eq!(read.users.len(), 1000);
    assert!(read.unknown_extensions.is_empty());
    let u = &read.users[0];
    assert!(
        u.get(UserField::FirstName).is_some_and(|v| !v.is_empty()),
        "{u:?}"
    );
    assert!(
        u.get(UserField::Password)
            .is_some_and(|v| v.starts_with("ha1:"))
    );

    // Groups select their members in the same read.
    let sales = pbx
        .read_users(&UserSelection {
            groups: vec!["sales".into(), "nobody".into()],
            extensions: vec![],
        })
        .await
        .unwrap();
    assert!(!sales.users.is_empty() && sales.users.len() < 1000);
    assert!(sales.users.iter().all(|u| {
        u.get(UserField::Groups)
            .unwrap()
            .split(',')
            .any(|g| g == "sales")
    }));
    assert_eq!(sales.empty_groups, ["nobody"]);

    let changes: Vec<UserChange> = read
        .users
        .iter()
        .map(|u| UserChange {
            extension: u.extension.clone(),
            takes: vec![],
            writes: vec![
                FieldWrite {
                    field: UserField::CallGroup,
                    from: u.get(UserField::CallGroup).map(Into::into),
                    to: NewValue::Set("42".into()),
                },
                FieldWrite {
                    field: UserField::Role,
                    from: u.get(UserField::Role).map(Into::into),
                    to: NewValue::Set("Operator".into()),
                },
            ],
        })
        .collect();
    let start = Instant::now();
    let outcomes = pbx.apply_user_changes(&changes, true).await.unwrap();
    eprintln!(
        "{db}: wrote 1000 users x 2 fields in one transaction in {:?}",
        start.elapsed()
    );
    assert!(
        outcomes.iter().all(|o| *o == WriteOutcome::Applied),
        "{:?}",
        outcomes.iter().find(|o| **o != WriteOutcome::Applied)
    );

    let pool = sql_pool(&lab).await;
    let q =
        "SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.call_group' AND value = '42'";
    let n: i64 = sqlx::query(q).fetch_one(&pool).await.unwrap().get(0);
    assert_eq!(n, 1000, "every user has the new call group in SQL");
    assert_eq!(
        attribute(&pool, "321", "pbx.role").await.as_deref(),
        Some("Operator")
    );

    // Atomic: one conflict rolls back everybody.
    let again: Vec<UserChange> = changes
        .iter()
        .map(|c| UserChange {
            extension: c.extension.clone(),
            takes: vec![],
            writes: vec![FieldWrite {
                field: UserField::CallGroup,
                from: Some("42".into()),
                to: NewValue::Set("7".into()),
            }],
        })
        .collect();
    sqlx::query("UPDATE usr_preferences SET value = '13' WHERE username = '500' AND attribute = 'pbx.call_group'")
        .execute(&pool)
        .await
        .unwrap();
    let outcomes = pbx.apply_user_changes(&again, true).await.unwrap();
    let moved = again.iter().position(|c| c.extension == "500").unwrap();
    assert!(
        matches!(&outcomes[moved], WriteOutcome::Conflict { found: Some(f), .. } if f == "13"),
        "{:?}",
        outcomes[moved]
    );
    assert!(
        outcomes
            .iter()
            .filter(|o| **o == WriteOutcome::RolledBack)
            .count()
            == 999
    );
    let q =
        "SELECT COUNT(*) FROM usr_preferences WHERE attribute = 'pbx.call_group' AND value = '7'";
    let n: i64 = sqlx::query(q).fetch_one(&pool).await.unwrap().get(0);
    assert_eq!(n, 0, "nothing of a rolled-back batch is written");
}

/// Kamailio keeps a preference as rows of usr_preferences with no unique key: a user may have
/// none (the default applies) or, written by other tools, two. A bulk write gives each user the
/// value whatever it had and leaves no row with the old one; MySQL inserts only where the read
/// found no row.
async fn a_write_lands_whether_a_user_has_no_row_one_or_two(db: &'static str) {
    let lab = Lab::start(LabSpec {
        db,
        users: 10,
        phones: 0,
        ..Default::default()
    });
    let pbx = backend(&lab).await;
    let pool = sql_pool(&lab).await;
    let rows_of = |ext: &'static str| {
        let pool = pool.clone();
        async move {
            let q = format!(
                "SELECT value FROM usr_preferences WHERE username = '{ext}' AND attribute = 'pbx.call_group'"
            );
            let rows = sqlx::query(AssertSqlSafe(q))
                .fetch_all(&pool)
                .await
                .unwrap();
            rows.iter()
                .map(|r| r.get::<String, _>(0))
                .collect::<Vec<_>>()
        }
    };
    sqlx::query(
        "DELETE FROM usr_preferences WHERE username = '201' AND attribute = 'pbx.call_group'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let q = "INSERT INTO usr_preferences (uuid, username, domain, attribute, type, value, last_modified) SELECT uuid, username, domain, attribute, type, value, last_modified FROM usr_preferences WHERE username = '202' AND attribute = 'pbx.call_group'";
    sqlx::query(q).execute(&pool).await.unwrap();
    assert!(rows_of("201").await.is_empty());
    assert_eq!(
        rows_of("202").await.len(),
        2,
        "the seed gave 202 a call group"
    );

    let read = pbx.read_users(&all(10)).await.unwrap();
    let changes: Vec<UserChange> = read
        .users
        .iter()
        .map(|u| UserChange {
            extension: u.extension.clone(),
            takes: vec![],
            writes: vec![FieldWrite {
                field: UserField::CallGroup,
                from: u.get(UserField::CallGroup).map(Into::into),
                to: NewValue::Set("42".into()),
            }],
        })
        .collect();
    let outcomes = pbx.apply_user_changes(&changes, false).await.unwrap();
    assert!(
        outcomes.iter().all(|o| *o == WriteOutcome::Applied),
        "{outcomes:?}"
    );
    assert_eq!(rows_of("201").await, ["42"], "a user with no row gets one");
    // PostgreSQL and SQLite replace the rows with one, MySQL updates both in place: either
    // way no row of 202 keeps the old value.
    let rows = rows_of("202").await;
    assert!(
        !rows.is_empty() && rows.iter().all(|v| v == "42"),
        "202: {rows:?}"
    );
    for ext in ["200", "203", "209"] {
        assert_eq!(rows_of(ext).await, ["42"], "{ext}");
    }
    let after = pbx.read_users(&all(10)).await.unwrap();
    assert!(
        after
            .users
            .iter()
            .all(|u| u.get(UserField::CallGroup) == Some("42")),
        "{:?}",
        after
            .users
            .iter()
            .map(|u| u.get(UserField::CallGroup))
            .collect::<Vec<_>>()
    );
}

/// A Continue write is committed in chunks of 2,000 users, on MySQL and PostgreSQL two chunks at
/// once: every user still gets its own outcome, in its place, and the rows land. Users without a
/// row sit on both sides of each chunk boundary, so two transactions insert into neighbouring
/// gaps of the index (where InnoDB's gap locks can make one of them a deadlock's victim).
async fn a_write_of_many_chunks_gives_each_user_its_own_outcome(db: &'static str) {
    let n = 4500;
    let lab = Lab::start(LabSpec {
        db,
        users: n,
        phones: 0,
        ..Default::default()
    });
    let pbx = backend(&lab).await;
    let pool = sql_pool(&lab).await;
    let read = pbx.read_users(&all(n)).await.unwrap();
    assert_eq!(read.users.len(), n);
    // Around the boundaries of the chunks (index 2000 and 4000) nobody has a call group.
    let rowless: Vec<String> = [1995..2005, 3995..4005]
        .into_iter()
        .flatten()
        .map(|i| read.users[i].extension.clone())
        .collect();
    let list = rowless.join("','");
    let q = format!(
        "DELETE FROM usr_preferences WHERE attribute = 'pbx.call_group' AND username IN ('{list}')"
    );
    sqlx::query(AssertSqlSafe(q)).execute(&pool).await.unwrap();

    // One user in the second chunk was planned against a value it no longer has.
    let stale = 2500;
    let mut changes: Vec<UserChange> = read
        .users
        .iter()
        .map(|u| UserChange {
            extension: u.extension.clone(),
            takes: vec![],
            writes: vec![FieldWrite {
                field: UserField::CallGroup,
                from: if rowless.contains(&u.extension) {
                    None
                } else {
                    u.get(UserField::CallGroup).map(Into::into)
                },
                to: NewValue::Set("77".into()),
            }],
        })
        .collect();
    changes[stale].writes[0].from = Some("not what it holds".into());
    // And one in the third chunk is gone.
    changes.push(UserChange {
        extension: "99999".into(),
        takes: vec![],
        writes: vec![FieldWrite {
            field: UserField::CallGroup,
            from: None,
            to: NewValue::Set("77".into()),
        }],
    });

    let outcomes = pbx.apply_user_changes(&changes, false).await.unwrap();
    assert_eq!(outcomes.len(), changes.len());
    for (i, outcome) in outcomes.iter().enumerate() {
        let expected = if i == stale {
            matches!(outcome, WriteOutcome::Conflict { .. })
        } else if i == n {
            *outcome == WriteOutcome::NotFound
        } else {
            *outcome == WriteOutcome::Applied
        };
        assert!(expected, "{}: {outcome:?}", changes[i].extension);
    }
    let after = pbx.read_users(&all(n)).await.unwrap();
    let unchanged: Vec<&str> = after
        .users
        .iter()
        .filter(|u| u.get(UserField::CallGroup) != Some("77"))
        .map(|u| u.extension.as_str())
        .collect();
    assert_eq!(unchanged, [read.users[stale].extension.as_str()]);
    for ext in &rowless {
        assert_eq!(
            attribute(&pool, ext, "pbx.call_group").await.as_deref(),
            Some("77"),
            "{ext}"
        );
    }
}

async fn conflicts_and_literal_values(db: &'static str) {
    let lab = Lab::start(LabSpec {
        db,
        users: 5,
        phones: 0,
        ..Default::default()
    });
    let pbx = backend(&lab).await;
    let pool = sql_pool(&lab).await;
    let read = pbx.read_users(&all(3)).await.unwrap();

    // Planned from the values read; then somebody edits 201 in between.
    let plan: Vec<UserChange> = read
        .users
        .iter()
        .map(|u| UserChange {
            extension: u.extension.clone(),
            takes: vec![],
            writes: vec![FieldWrite {
                field: UserField::PickupGroup,
                from: u.get(UserField::PickupGroup).map(Into::into),
                to: NewValue::Set("9".into()),
            }],
        })
        .collect();
    sqlx::query("UPDATE usr_preferences SET value = '5' WHERE username = '201' AND attribute = 'pbx.pickup_group'")
        .execute(&pool)
        .await
        .unwrap();
    let outcomes = pbx.apply_user_changes(&plan, false).await.unwrap();
    assert_eq!(outcomes[0], WriteOutcome::Applied);
    assert!(
        matches!(&outcomes[1], WriteOutcome::Conflict { field: UserField::PickupGroup, found: Some(v), .. } if v == "5")
    );
    assert_eq!(outcomes[2], WriteOutcome::Applied);
    assert_eq!(
        attribute(&pool, "201", "pbx.pickup_group").await.as_deref(),
        Some("5"),
        "a conflict is not overwritten"
    );
    assert_eq!(
        attribute(&pool, "202", "pbx.pickup_group").await.as_deref(),
        Some("9")
    );

    // SQL metacharacters are stored literally.
    let nasty = "O'Brien\"; DROP TABLE subscriber; --";
    let before = read
        .users
        .iter()
        .find(|u| u.extension == "202")
        .unwrap()
        .get(UserField::LastName)
        .map(Into::into);
    let change = UserChange {
        extension: "202".into(),
        takes: vec![],
        writes: vec![FieldWrite {
            field: UserField::LastName,
            from: before,
            to: NewValue::Set(nasty.into()),
        }],
    };
    assert_eq!(
        pbx.apply_user_changes(&[change], false).await.unwrap(),
        [WriteOutcome::Applied]
    );
    assert_eq!(
        attribute(&pool, "202", "pbx.last_name").await.as_deref(),
        Some(nasty)
    );
    let n: i64 = sqlx::query("SELECT COUNT(*) FROM subscriber")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 5, "the subscriber table is intact");

    // Remove refuses a user who owns numbers.
    let outcomes = pbx
        .apply_actions(&[("202".into(), UserAction::Remove)])
        .await
        .unwrap();
    assert!(
        matches!(&outcomes[0], ActionOutcome::Skipped(m) if m.contains("owns 1 numbers: reassign them first")),
        "{outcomes:?}"
    );
}

async fn locked_users_are_refused_at_register(db: &'static str) {
    let lab = Lab::start(LabSpec {
        db,
        users: 5,
        phones: 2,
        ..Default::default()
    });
    let pbx = backend(&lab).await;
    assert_eq!(lab.register_once("201"), 200, "an unlocked user registers");
    let outcome = pbx
        .apply_actions(&[("201".into(), UserAction::Lock)])
        .await
        .unwrap();
    assert_eq!(outcome, [ActionOutcome::Done]);
    assert!(
        pbx.lookup("201").await.unwrap().is_empty(),
        "locking drops the live registrations"
    );
    assert_eq!(
        lab.register_once("201"),
        403,
        "Kamailio refuses a locked user's REGISTER"
    );
    assert_eq!(
        pbx.apply_actions(&[("201".into(), UserAction::Unlock)])
            .await
            .unwrap(),
        [ActionOutcome::Done]
    );
    assert_eq!(lab.register_once("201"), 200);
}

async fn notify_reboots_a_phone_and_a_silent_one_does_not_block_others(db: &'static str) {
    let lab = Lab::start(LabSpec {
        db,
        users: 10,
        phones: 3,
        silent: 1,
        no_reboot: 0,
    });
    let pbx = backend(&lab).await;
    let regs = pbx.registrations().await.unwrap();
    let phones = lab.list("LAB_PHONES_REBOOT");
    let silent = lab.list("LAB_PHONES_SILENT");
    assert_eq!(regs.len(), phones.len() + silent.len(), "{regs:?}");
    assert!(
        regs.iter().any(|r| r.user_agent.starts_with("Yealink")),
        "{regs:?}"
    );

    // The bindings a restart reads from `location` (SQL: one query for many phones) are the
    // registrar's own, Last-Modified included (Kamailio writes its local time; this machine's
    // is UTC).
    let all: Vec<String> = regs.iter().map(|r| r.extension.clone()).collect();
    let key = |r: &pbx_operator::pbx::Registration| {
        (
            r.extension.clone(),
            r.contact.clone(),
            r.received.clone(),
            r.socket.clone(),
            r.call_id.clone(),
            r.user_agent.clone(),
        )
    };
    let from_sql = pbx.lookup_many(&all).await.unwrap();
    let mut a: Vec<_> = regs.iter().map(key).collect();
    let mut b: Vec<_> = from_sql.iter().map(key).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "location vs ul.dump");
    for r in &from_sql {
        let rpc = regs.iter().find(|x| x.extension == r.extension).unwrap();
        assert!(
            (r.last_modified - rpc.last_modified).abs() <= 1,
            "{} vs {}",
            r.last_modified,
            rpc.last_modified
        );
    }
    let one = pbx.lookup_many(&all[..1]).await.unwrap();
    assert!(one.iter().all(|r| r.extension == all[0]) && !one.is_empty());

    let target = regs
        .iter()
        .find(|r| r.extension == phones[0])
        .unwrap()
        .clone();
    let quiet = regs
        .iter()
        .find(|r| r.extension == silent[0])
        .unwrap()
        .clone();
    let started = Instant::now();
    let (to_silent, to_phone) = tokio::join!(pbx.notify(&quiet, "check-sync;reboot=true"), async {
        let answer = pbx.notify(&target, "check-sync;reboot=true").await;
        (answer, started.elapsed())
    });
    let (answer, phone_took) = to_phone;
    assert_eq!(answer.unwrap().code, 200);
    assert!(
        phone_took < Duration::from_secs(2),
        "the silent phone held up the other NOTIFY: {phone_took:?}"
    );
    let silent_answer = to_silent.unwrap();
    assert_eq!(silent_answer.code, 408, "{silent_answer:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the failure came back within the timeout"
    );

    // The reboot shows as a fresh REGISTER: new Call-ID, later Last-Modified.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = pbx.lookup(&target.extension).await.unwrap();
        if let Some(r) = now.first() {
            if r.call_id != target.call_id && r.last_modified >= target.last_modified {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the phone did not register again: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let again = pbx
        .lookup_many(std::slice::from_ref(&target.extension))
        .await
        .unwrap();
    let before = from_sql
        .iter()
        .find(|r| r.extension == target.extension)
        .unwrap();
    assert!(
        again
            .iter()
            .any(|r| r.call_id != before.call_id && r.last_modified >= before.last_modified),
        "{again:?}"
    );
    let counts = lab.notify_counts();
    assert_eq!(counts.get(&target.extension), Some(&1), "{counts:?}");
    assert_eq!(counts.get(&phones[1]), Some(&0), "{counts:?}");
}

async fn header_injection_through_a_contact_is_refused(db: &'static str) {
    let lab = Lab::start(LabSpec {
        db,
        users: 3,
        phones: 1,
        ..Default::default()
    });
    let pbx = backend(&lab).await;
    let mut reg = pbx.registrations().await.unwrap().remove(0);
    reg.contact = format!("{}\r\nX-Injected: 1", reg.contact);
    let err = pbx.notify(&reg, "check-sync").await.unwrap_err();
    assert!(err.to_string().contains("not a plain SIP URI"), "{err}");
    let err = pbx
        .notify(
            &pbx.registrations().await.unwrap()[0],
            "check-sync\r\nX-Evil: 1",
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("control characters"), "{err}");
    assert_eq!(
        lab.notify_counts().values().sum::<u32>(),
        0,
        "nothing was sent"
    );
}

async fn connection_errors_say_what_to_fix(db: &'static str) {
    let lab = Lab::start(LabSpec {
        db,
        users: 1,
        phones: 0,
        ..Default::default()
    });
    if db == "sqlite" {
        // No login: the mistake to report is a file that is not there.
        let missing = lab.db_url().replace("kamailio.db", "missing.db");
        let err = Kamailio::connect(KamailioConfig::new(&missing, lab.rpc_url(), lab.domain()))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "DatabaseUnreachable", "{err}");
    } else {
        let bad_password = lab.db_url().replacen("kamailio:", "kamailio:wrong", 1);
        let err = Kamailio::connect(KamailioConfig::new(
            &bad_password,
            lab.rpc_url(),
            lab.domain(),
        ))
        .await
        .unwrap_err();
        assert_eq!(err.reason(), "DatabaseAuthFailed", "{err}");
        assert!(
            !err.to_string().contains("wrong"),
            "the password leaked into the message: {err}"
        );
    }

    let pbx = Kamailio::connect(KamailioConfig::new(
        lab.db_url(),
        "http://127.0.0.1:1/RPC",
        lab.domain(),
    ))
    .await
    .unwrap();
    let err = pbx.probe().await.unwrap_err();
    assert_eq!(err.reason(), "RpcUnreachable", "{err}");

    let pool = sql_pool(&lab).await;
    sqlx::query("DROP TABLE grp").execute(&pool).await.unwrap();
    let err = Kamailio::connect(KamailioConfig::new(
        lab.db_url(),
        lab.rpc_url(),
        lab.domain(),
    ))
    .await
    .unwrap_err();
    assert_eq!(err.reason(), "MissingTables", "{err}");
    assert!(err.to_string().contains("grp"), "{err}");
}

/// A number has one holder: a change may take it only from the holder it names, and then the
/// holder loses it (and its location) in the same transaction.
async fn numbers_move_only_from_the_named_holder(db: &'static str) {
    use pbx_operator::pbx::directory::Move;
    let lab = Lab::start(LabSpec {
        db,
        users: 10,
        phones: 0,
        ..Default::default()
    });
    let pbx = backend(&lab).await;
    let pool = sql_pool(&lab).await;
    let give = |takes: Vec<Move>| UserChange {
        extension: "204".into(),
        writes: vec![FieldWrite {
            field: UserField::PrimaryNumber,
            from: None,
            to: NewValue::Set("+15550100201".into()),
        }],
        takes,
    };
    // 201's number, without naming 201: refused, nothing written.
    let out = pbx
        .apply_user_changes(&[give(vec![])], false)
        .await
        .unwrap();
    assert_eq!(
        out,
        [WriteOutcome::NumberHeld {
            field: UserField::PrimaryNumber,
            number: "+15550100201".into(),
            holder: "201".into()
        }]
    );
    // Naming someone else is refused too.
    let wrong = Move {
        number: "+15550100201".into(),
        holder: "202".into(),
        held_as: UserField::PrimaryNumber,
    };
    let out = pbx
        .apply_user_changes(&[give(vec![wrong])], false)
        .await
        .unwrap();
    assert!(matches!(out[0], WriteOutcome::NumberHeld { .. }), "{out:?}");
    // Naming 201: the number moves.
    let right = Move {
        number: "+15550100201".into(),
        holder: "201".into(),
        held_as: UserField::PrimaryNumber,
    };
    let out = pbx
        .apply_user_changes(&[give(vec![right])], true)
        .await
        .unwrap();
    assert_eq!(out, [WriteOutcome::Applied]);
    let holders: Vec<String> = sqlx::query(AssertSqlSafe(
        "SELECT username FROM dbaliases WHERE alias_username = '+15550100201'".to_string(),
    ))
    .fetch_all(&pool)
    .await
    .unwrap()
    .iter()
    .map(|r| r.get::<String, _>(0))
    .collect();
    assert_eq!(holders, ["204"]);
    assert_eq!(
        attribute(&pool, "201", "pbx.primary_number_location").await,
        None
    );
    let read = pbx.read_users(&all(10)).await.unwrap();
    let u201 = read.users.iter().find(|u| u.extension == "201").unwrap();
    assert!(u201.numbers.is_empty());
}

/// pbx_phone (the operator's own table) on each database: read by owner, a model changed only
/// where it is still what was read, a label set where there was none.
async fn phones_are_read_and_changed_with_compare_and_set(db: &'static str) {
    let lab = Lab::start(LabSpec {
        db,
        users: 6,
        phones: 4,
        ..Default::default()
    });
    let pbx = backend(&lab).await;
    let pool = sql_pool(&lab).await;
    let phones = pbx.read_phones(&all(6)).await.unwrap();
    assert_eq!(phones.len(), 4, "{phones:?}");
    let yealink = phones.iter().find(|p| p.vendor == "Yealink").unwrap();
    assert_eq!(yealink.owner.as_deref(), Some("200"));
    assert_eq!(yealink.model, "SIP-T46S");
    assert!(yealink.mac.starts_with("805ec0"), "{yealink:?}");
    let poly = phones.iter().find(|p| p.vendor == "Poly").unwrap();

    sqlx::query(AssertSqlSafe(format!(
        "UPDATE pbx_phone SET model = 'VVX 250' WHERE id = {}",
        poly.id
    )))
    .execute(&pool)
    .await
    .unwrap();
    let out = pbx
        .apply_phone_changes(&[
            (
                yealink.id,
                PhoneField::Model,
                "SIP-T46S".into(),
                "SIP-T54W".into(),
            ),
            (
                poly.id,
                PhoneField::Model,
                "VVX 450".into(),
                "VVX 350".into(),
            ),
            (
                yealink.id,
                PhoneField::Label,
                "Desk 200".into(),
                "Desk 200".into(),
            ),
        ])
        .await
        .unwrap();
    assert_eq!(out[0], WriteOutcome::Applied);
    assert!(matches!(out[1], WriteOutcome::Conflict { .. }), "{out:?}");
    assert_eq!(
        out[2],
        WriteOutcome::Applied,
        "setting the value it has is no conflict"
    );
    let now = pbx.read_phones(&all(6)).await.unwrap();
    let model = |id: i64| now.iter().find(|p| p.id == id).unwrap().model.clone();
    assert_eq!(model(yealink.id), "SIP-T54W");
    assert_eq!(model(poly.id), "VVX 250", "a conflict is not overwritten");
}

/// The rest of what the controllers read and write, on each database: the policy catalogue
/// (a UNION of the operator's table and Kamailio's), the extension list, the probe's counts,
/// and a full UserRecycle reset of a user who owns a phone and a number.
async fn catalogue_export_and_reset(db: &'static str) {
    use pbx_operator::pbx::{ResetOutcome, ResetPart, UserReset};
    let lab = Lab::start(LabSpec {
        db,
        users: 6,
        phones: 2,
        ..Default::default()
    });
    let pbx = backend(&lab).await;
    let pool = sql_pool(&lab).await;
    let p = pbx.policies().await.unwrap();
    assert!(
        ["Default", "Anonymous", "Reception"]
            .iter()
            .all(|n| p.caller_id.contains(*n)),
        "{p:?}"
    );
    assert!(
        ["Domestic", "International", "Internal"]
            .iter()
            .all(|n| p.voice_route.contains(*n)),
        "{p:?}"
    );
    assert_eq!(
        pbx.extensions().await.unwrap(),
        ["200", "201", "202", "203", "204", "205"]
    );
    let probe = pbx.probe().await.unwrap();
    assert_eq!((probe.users, probe.registered_phones), (6, 2), "{probe:?}");

    let all_parts = vec![
        ResetPart::Name,
        ResetPart::Email,
        ResetPart::Password,
        ResetPart::VoicemailPin,
        ResetPart::Devices,
        ResetPart::Role,
        ResetPart::Groups,
        ResetPart::Numbers,
        ResetPart::CallGroup,
        ResetPart::PickupGroup,
    ];
    let out = pbx
        .reset_users(&[UserReset {
            extension: "201".into(),
            parts: all_parts,
        }])
        .await
        .unwrap();
    let [ResetOutcome::Done { before, unassigned }] = out.as_slice() else {
        panic!("{out:?}");
    };
    assert_eq!(before.numbers, ["+15550100201"]);
    assert_eq!(unassigned.len(), 1, "{unassigned:?}");
    let read = pbx.read_users(&all(6)).await.unwrap();
    let u = read.users.iter().find(|u| u.extension == "201").unwrap();
    assert_eq!(u.get(UserField::FirstName), None, "{u:?}");
    assert_eq!(u.get(UserField::Status), Some("SetupRequired"), "{u:?}");
    assert!(u.numbers.is_empty(), "{u:?}");
    let owners: i64 = sqlx::query("SELECT COUNT(*) FROM pbx_phone WHERE owner_username = '201'")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get(0);
    assert_eq!(owners, 0, "the phone is unassigned");
    assert_eq!(
        attribute(&pool, "202", "pbx.first_name").await.as_deref(),
        Some("Chloe"),
        "other users are untouched"
    );
}

/// Snapshots (pbx_snapshot, on each database): kept once per run before a user goes, without
/// credentials; a restore brings every row back but the secret and status, leaves a number
/// someone took meanwhile to them (named), is recorded so the same run finds it done, and is
/// refused over an extension that exists again; an expired snapshot has lost its data.
async fn a_snapshot_brings_a_removed_user_back_and_names_what_others_hold_now(db: &'static str) {
    use pbx_operator::pbx::{Expect, RestoreOutcome, UserRestore};
    use support::lab::user_rows;
    let lab = Lab::start(LabSpec {
        db,
        users: 8,
        phones: 5,
        ..Default::default()
    });
    let pbx = backend(&lab).await;
    let pool = sql_pool(&lab).await;
    let exec = |sql: &str| {
        let sql = sql.to_string();
        let pool = pool.clone();
        async move {
            sqlx::query(AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    // 203 has a private number, a primary number, a group and a phone; and a PIN and a second
    // factor, which are never kept.
    exec("INSERT INTO usr_preferences (username, domain, attribute, type, value) VALUES ('203', 'pbx.test', 'pbx.voicemail_pin', 2, 'pbkdf2$secret'), ('203', 'pbx.test', 'pbx.totp_secret', 2, 'TOTPSECRET')").await;
    let before = user_rows(&pool, "203").await;
    assert!(
        before
            .iter()
            .any(|r| r.contains("pbx.private_number|2|+15550200203")),
        "{before:#?}"
    );
    assert!(
        before.iter().any(|r| r.starts_with("dbaliases")),
        "{before:#?}"
    );
    assert!(
        before.iter().any(|r| r.starts_with("pbx_phone")),
        "{before:#?}"
    );

    pbx.keep_snapshots("run-a", &["203".into(), "299".into()])
        .await
        .unwrap();
    // A second keep of the same run keeps the first snapshot: the state before the run.
    exec("UPDATE usr_preferences SET value = 'Changed' WHERE username = '203' AND attribute = 'pbx.first_name'").await;
    pbx.keep_snapshots("run-a", &["203".into()]).await.unwrap();
    let kept = pbx
        .snapshots("run-a", &["203".into(), "299".into()])
        .await
        .unwrap();
    assert_eq!(
        kept.len(),
        1,
        "no snapshot of an extension that does not exist: {kept:?}"
    );
    let snapshot = kept[0].snapshot.clone().expect("fresh");
    let data = serde_json::to_string(&snapshot).unwrap();
    assert!(
        !data.contains("Changed"),
        "the first snapshot stays: {data}"
    );
    for secret in ["pbkdf2", "TOTPSECRET", "ha1"] {
        assert!(!data.contains(secret), "{secret} kept: {data}");
    }
    assert_eq!(snapshot.private_number.as_deref(), Some("+15550200203"));

    // The user goes (as Remove and a numbers reset would), and 205 gets its private number.
    for table in ["usr_preferences", "grp", "dbaliases", "subscriber"] {
        exec(&format!("DELETE FROM {table} WHERE username = '203'")).await;
    }
    exec("UPDATE pbx_phone SET owner_username = NULL WHERE owner_username = '203'").await;
    exec("INSERT INTO usr_preferences (username, domain, attribute, type, value) VALUES ('205', 'pbx.test', 'pbx.private_number', 2, '+15550200203')").await;

    let restore = |by: &str, expect: Expect| UserRestore {
        run: "run-a".into(),
        by: by.into(),
        snapshot: snapshot.clone(),
        expect,
    };
    let out = pbx
        .restore_users(&[restore("revert-1", Expect::Absent)])
        .await
        .unwrap();
    let [RestoreOutcome::Restored { conflicts }] = out.as_slice() else {
        panic!("{out:?}");
    };
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert!(
        conflicts[0].contains("+15550200203") && conflicts[0].contains("205"),
        "{conflicts:?}"
    );
    let after = user_rows(&pool, "203").await;
    let expected: Vec<String> = before
        .iter()
        .filter(|r| !r.contains("private_number"))
        .cloned()
        .collect();
    assert_eq!(
        after, expected,
        "every row back but the private number 205 holds now"
    );
    let status = attribute(&pool, "203", "pbx.status").await;
    assert_eq!(status.as_deref(), Some("PasswordRequired"));
    assert_eq!(attribute(&pool, "203", "pbx.voicemail_pin").await, None);
    let ha1: String = sqlx::query("SELECT ha1 FROM subscriber WHERE username = '203'")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get(0);
    assert_eq!(ha1.len(), 32, "a new secret nobody knows");

    // The same run again (a resume after a crash): found done, nothing written twice.
    let out = pbx
        .restore_users(&[restore("revert-1", Expect::Absent)])
        .await
        .unwrap();
    assert_eq!(out, [RestoreOutcome::AlreadyRestored]);
    assert_eq!(user_rows(&pool, "203").await, expected);
    // Another run over an extension that exists: refused, nothing written.
    let out = pbx
        .restore_users(&[restore("revert-2", Expect::Absent)])
        .await
        .unwrap();
    assert!(
        matches!(&out[0], RestoreOutcome::Conflict(m) if m.contains("exists again")),
        "{out:?}"
    );
    // A recycle's revert compares what the recycle left: a name changed since is a conflict.
    let moved = Expect::Present(vec![(UserField::FirstName, Some("Bea".into()))]);
    let out = pbx
        .restore_users(&[restore("revert-3", moved)])
        .await
        .unwrap();
    assert!(
        matches!(&out[0], RestoreOutcome::Conflict(m) if m.contains("Bea")),
        "{out:?}"
    );

    // Past the retention the data is deleted; a marker says when.
    let now = jiff::Timestamp::now().as_millisecond();
    assert_eq!(pbx.expire_snapshots(now + 1).await.unwrap(), 1);
    let kept = pbx.snapshots("run-a", &["203".into()]).await.unwrap();
    assert_eq!(kept[0].snapshot, None);
    assert!(kept[0].expired.is_some());
    let left: Option<String> = sqlx::query("SELECT data FROM pbx_snapshot WHERE username = '203'")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, None, "the personal data is gone from the database");
}

/// The index pbx-operator adds to Kamailio's usr_preferences needs the table's owner. A login
/// granted the tables but not owning them connects and writes whether the index is there or not;
/// without it, it is left missing (a warning), not half-made.
#[tokio::test]
async fn postgres_connects_as_a_login_that_does_not_own_kamailio_tables() {
    let lab = Lab::start(LabSpec {
        db: "postgres",
        users: 3,
        phones: 0,
        ..Default::default()
    });
    // The owner's first connect creates pbx-operator's tables and the index.
    drop(backend(&lab).await);
    sqlx::any::install_default_drivers();
    let db_name = lab.db_url().rsplit('/').next().unwrap().to_string();
    let (server, _) = lab.get("LAB_PG_ADMIN_URL").rsplit_once('/').unwrap();
    let admin_url = format!("{server}/{db_name}");
    let admin = AnyPool::connect(&admin_url).await.unwrap();
    for q in [
        "CREATE ROLE pbx_helper LOGIN PASSWORD 'helper-pw'",
        // Its own tables it may create (CREATE TABLE IF NOT EXISTS asks for this even when
        // they exist) and owns; Kamailio's it may read and write.
        "GRANT CREATE ON SCHEMA public TO pbx_helper",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO pbx_helper",
        "GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO pbx_helper",
    ] {
        sqlx::query(q).execute(&admin).await.unwrap();
    }
    // pbx-operator's own tables are the login's.
    let own = "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 'pbx\\_%'";
    for row in sqlx::query(own).fetch_all(&admin).await.unwrap() {
        let table: String = row.get(0);
        let q = format!("ALTER TABLE {table} OWNER TO pbx_helper");
        sqlx::query(AssertSqlSafe(q)).execute(&admin).await.unwrap();
    }
    let index_count = || {
        let admin = admin.clone();
        async move {
            let q = "SELECT COUNT(*) FROM pg_indexes WHERE indexname = 'pbx_private_number_idx'";
            sqlx::query(q)
                .fetch_one(&admin)
                .await
                .unwrap()
                .get::<i64, _>(0)
        }
    };
    assert_eq!(index_count().await, 1, "the owner's connect made the index");
    let at = lab.db_url().find('@').unwrap();
    let helper_url = format!("postgres://pbx_helper:helper-pw{}", &lab.db_url()[at..]);
    let as_helper = || async {
        let mut config = KamailioConfig::new(&helper_url, lab.rpc_url(), lab.domain());
        config.notify_timeout = Duration::from_secs(15);
        Kamailio::connect(config).await
    };
    let helper = as_helper()
        .await
        .expect("a login that does not own the table connects");
    drop(helper);

    sqlx::query("DROP INDEX pbx_private_number_idx")
        .execute(&admin)
        .await
        .unwrap();
    let helper = as_helper()
        .await
        .expect("without the index, and unable to create it, the login still connects");
    assert_eq!(index_count().await, 0, "nothing was made of the index");
    let read = helper.read_users(&all(3)).await.unwrap();
    let change = UserChange {
        extension: "201".into(),
        takes: vec![],
        writes: vec![FieldWrite {
            field: UserField::PrivateNumber,
            from: read.users[1].get(UserField::PrivateNumber).map(Into::into),
            to: NewValue::Set("+15550001234".into()),
        }],
    };
    let outcomes = helper.apply_user_changes(&[change], false).await.unwrap();
    assert_eq!(outcomes, [WriteOutcome::Applied]);
    let pool = sql_pool(&lab).await;
    assert_eq!(
        attribute(&pool, "201", "pbx.private_number")
            .await
            .as_deref(),
        Some("+15550001234")
    );
}

/// A MySQL server outside strict mode cuts a value too long for its column short, silently.
/// The backend's sessions are strict whatever the server says: the too-long value fails its user
/// (nothing of it written) and the others apply, as on PostgreSQL.
#[tokio::test]
async fn mysql_never_stores_a_value_cut_short() {
    let lab = Lab::start(LabSpec {
        db: "mysql",
        users: 3,
        phones: 0,
        ..Default::default()
    });
    sqlx::any::install_default_drivers();
    let admin = AnyPool::connect(lab.get("LAB_DB_ADMIN_URL")).await.unwrap();
    sqlx::query("SET GLOBAL sql_mode = ''")
        .execute(&admin)
        .await
        .unwrap();
    let long = "x".repeat(200); // usr_preferences.value is VARCHAR(128)
    // A plain session now truncates: the server really is lax.
    let lax = sql_pool(&lab).await;
    let q = format!(
        "UPDATE usr_preferences SET value = '{long}' WHERE username = '202' AND attribute = 'pbx.email'"
    );
    sqlx::query(AssertSqlSafe(q)).execute(&lax).await.unwrap();
    assert_eq!(
        attribute(&lax, "202", "pbx.email").await.map(|v| v.len()),
        Some(128)
    );

    let pbx = backend(&lab).await;
    let read = pbx.read_users(&all(2)).await.unwrap();
    let change = |ext: &str, to: &str| UserChange {
        extension: ext.into(),
        takes: vec![],
        writes: vec![FieldWrite {
            field: UserField::LastName,
            from: read
                .users
                .iter()
                .find(|u| u.extension == ext)
                .unwrap()
                .get(UserField::LastName)
                .map(Into::into),
            to: NewValue::Set(to.into()),
        }],
    };
    let out = pbx
        .apply_user_changes(&[change("200", &long), change("201", "Short")], false)
        .await
        .unwrap();
    assert!(matches!(&out[0], WriteOutcome::Failed(_)), "{out:?}");
    assert_eq!(out[1], WriteOutcome::Applied);
    assert_eq!(
        attribute(&lax, "200", "pbx.last_name").await.as_deref(),
        Some("Diaz"),
        "nothing of the failed user is written"
    );
    assert_eq!(
        attribute(&lax, "201", "pbx.last_name").await.as_deref(),
        Some("Short")
    );
}

/// The database server stops (lab `db-stop`) and starts again: meanwhile reads fail as
/// DatabaseUnreachable (transient: the controllers retry), afterwards the same backend works
/// again without being rebuilt.
async fn an_outage_is_reported_and_the_backend_recovers(db: &'static str) {
    let lab = Lab::start(LabSpec {
        db,
        users: 5,
        phones: 0,
        ..Default::default()
    });
    let pbx = backend(&lab).await;
    assert_eq!(pbx.read_users(&all(5)).await.unwrap().users.len(), 5);
    lab.database(false);
    let err = pbx.read_users(&all(5)).await.unwrap_err();
    assert_eq!(err.reason(), "DatabaseUnreachable", "{err}");
    assert!(err.is_transient(), "{err}");
    lab.database(true);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match pbx.read_users(&all(5)).await {
            Ok(read) => {
                assert_eq!(read.users.len(), 5);
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "the backend did not recover: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Two chunks of a Continue write go at once; when the database rolls one of them back for a
/// lock it could not get (a lock wait timeout here; a deadlock between the two is the same
/// error class), that chunk is written again alone instead of the batch failing. Another
/// session holds a user of the second chunk until the chunk's first transaction is seen waiting
/// for it and then gone.
#[tokio::test]
async fn mysql_writes_again_a_chunk_rolled_back_for_a_lock() {
    let n = 4000;
    let lab = Lab::start(LabSpec {
        db: "mysql",
        users: n,
        phones: 0,
        ..Default::default()
    });
    sqlx::any::install_default_drivers();
    let admin = AnyPool::connect(lab.get("LAB_DB_ADMIN_URL")).await.unwrap();
    // For the backend's sessions, opened after this.
    sqlx::query("SET GLOBAL innodb_lock_wait_timeout = 2")
        .execute(&admin)
        .await
        .unwrap();
    let pbx = backend(&lab).await;
    let read = pbx.read_users(&all(n)).await.unwrap();
    let changes: Vec<UserChange> = read
        .users
        .iter()
        .map(|u| UserChange {
            extension: u.extension.clone(),
            takes: vec![],
            writes: vec![FieldWrite {
                field: UserField::CallGroup,
                from: u.get(UserField::CallGroup).map(Into::into),
                to: NewValue::Set("77".into()),
            }],
        })
        .collect();
    let held = read.users[3000].extension.clone();

    let pool = sql_pool(&lab).await;
    let mut holder = pool.begin().await.unwrap();
    let q = format!("SELECT value FROM usr_preferences WHERE username = '{held}' FOR UPDATE");
    sqlx::query(AssertSqlSafe(q))
        .fetch_all(&mut *holder)
        .await
        .unwrap();

    let write = tokio::spawn(async move { pbx.apply_user_changes(&changes, false).await });
    // How long the backend's compare-and-set read has been running, in milliseconds, if it runs.
    let read_running = || async {
        let q = "SELECT CAST(MAX(TIME_MS) AS CHAR) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'SELECT username, attribute, value FROM usr_preferences%'";
        let row = sqlx::query(q).fetch_one(&admin).await.unwrap();
        row.get::<Option<String>, _>(0)
            .map(|ms| ms.parse::<f64>().expect("TIME_MS is a number"))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    // Past half the lock wait timeout: that read waits for the held user.
    let mut waited = loop {
        match read_running().await {
            Some(ms) if ms >= 1000.0 => break ms,
            _ => {}
        }
        assert!(Instant::now() < deadline, "no read ever waited for {held}");
        if write.is_finished() {
            panic!(
                "the write ended without waiting for {held}: {:?}",
                write.await.unwrap().map(|o| o.len())
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Until that statement is gone (a later one is younger): it timed out, the lock still held.
    while let Some(ms) = read_running().await {
        if ms < waited {
            break;
        }
        waited = ms;
        assert!(
            Instant::now() < deadline,
            "the waiting read never timed out"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Its wait timed out while the lock was still held: that transaction is gone.
    holder.rollback().await.unwrap();

    let outcomes = write
        .await
        .unwrap()
        .expect("the rolled-back chunk is written again, not the batch failed");
    assert_eq!(outcomes.len(), n);
    assert!(
        outcomes.iter().all(|o| *o == WriteOutcome::Applied),
        "{:?}",
        outcomes.iter().find(|o| **o != WriteOutcome::Applied)
    );
    for i in [0, 1999, 2000, 3000, n - 1] {
        let ext = &read.users[i].extension;
        assert_eq!(
            attribute(&pool, ext, "pbx.call_group").await.as_deref(),
            Some("77"),
            "{ext}"
        );
    }
}
