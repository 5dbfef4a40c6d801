//! Provisioning through Kamailio's own SQL tables (subscriber, usr_preferences, grp, dbaliases)
//! plus pbx_phone, on PostgreSQL, SQLite or MySQL through one sqlx Any pool.
//!
//! Bulk by construction: reads use chunked `IN (...)` lists, writes are grouped per attribute
//! into one DELETE and one multi-row INSERT per chunk, all inside a transaction that first
//! re-reads the rows it is about to change (compare-and-set).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use futures::TryStreamExt;

use md5::{Digest, Md5};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::error::ErrorKind;
use sqlx::{AnyConnection, AnyPool, AssertSqlSafe, Row};

use super::schema::{self, Storage, TWO_FACTOR_ATTRIBUTE};
use crate::pbx::directory::Directory;
use crate::pbx::{
    ActionOutcome, FieldWrite, NewValue, PbxError, Phone, PhoneField, Policies, Registration,
    Result, Secret, Selected, User, UserAction, UserChange, UserField, UserRead, UserSelection,
    WriteOutcome,
};

#[path = "atomic.rs"]
mod atomic;
#[path = "ledger.rs"]
mod ledger;
#[path = "snapshot.rs"]
mod snapshot;

/// Rows per `IN (...)` list and per multi-row INSERT: well under every driver's parameter limit.
const CHUNK: usize = 500;
/// Users per transaction when failures must stay per user (Continue): few statements per batch,
/// short enough that Kamailio's own writes (SQLite) are not held up for long.
const WRITE_CHUNK: usize = 2000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
    MySql,
}

pub struct Db {
    pool: AnyPool,
    dialect: Dialect,
    domain: String,
    /// host:port/db without credentials, for messages.
    target: String,
}

/// host, port and database of a URL, never its user or password.
fn redacted_target(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) if u.scheme() == "sqlite" => format!("sqlite:{}", u.path()),
        Ok(u) => format!(
            "{}://{}{}{}",
            u.scheme(),
            u.host_str().unwrap_or(""),
            u.port().map(|p| format!(":{p}")).unwrap_or_default(),
            u.path()
        ),
        Err(_) => "<unparsable URL>".into(),
    }
}

impl Db {
    /// Closes the pool (see [`sqlx::Pool::close`]).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn connect(url: &str, domain: &str, max_connections: u32) -> Result<Db> {
        let dialect = match url.split_once("://").map(|(s, _)| s) {
            Some("postgres" | "postgresql") => Dialect::Postgres,
            Some("sqlite") => Dialect::Sqlite,
            Some("mysql" | "mariadb") => Dialect::MySql,
            _ => {
                return Err(PbxError::InvalidUrl(
                    "the database URL must start with postgres://, mysql:// or sqlite:// (e.g. sqlite:///var/lib/kamailio/kamailio.db)".into(),
                ));
            }
        };
        let url = if dialect == Dialect::MySql {
            url.replacen("mariadb://", "mysql://", 1)
        } else {
            url.to_string()
        };
        sqlx::any::install_default_drivers();
        crate::tls::install_crypto_provider();
        let target = redacted_target(&url);
        let mut options = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(std::time::Duration::from_secs(10))
            // A transaction the database ended by itself (SQLite's RAISE(ROLLBACK) in a trigger)
            // leaves the driver counting it as open and unable to roll it back: such a
            // connection is closed instead of handed out again.
            .before_acquire(|conn, _| {
                Box::pin(async move { Ok(!sqlx::Connection::is_in_transaction(conn)) })
            })
            // A connection keeps its buffers at the largest message it ever sent or read (a
            // batch's journal is megabytes): every pooled connection would hold one, and the
            // operator's memory grow with the connections a long run happened to use.
            .after_release(|conn, _| {
                Box::pin(async move {
                    sqlx::Connection::shrink_buffers(conn);
                    Ok(true)
                })
            });
        if dialect == Dialect::MySql {
            // A MySQL server outside strict mode stores a value too long for its column cut short
            // (and every later compare-and-set would then meet a value nobody wrote): refuse it
            // instead, as PostgreSQL does, whatever the server's own sql_mode.
            options = options.after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query(
                        "SET SESSION sql_mode = (SELECT CONCAT(@@sql_mode, ',STRICT_ALL_TABLES'))",
                    )
                    .execute(conn)
                    .await
                    .map(|_| ())
                })
            });
        }
        let pool = options
            .connect(&url)
            .await
            .map_err(|e| classify(&target, e))?;
        Ok(Db {
            pool,
            dialect,
            domain: domain.to_string(),
            target,
        })
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Queries are written with `$1`-style placeholders (PostgreSQL and SQLite); MySQL wants `?`.
    /// Every statement is built from constants and placeholders only; values are always bound,
    /// which is what makes the assertion below true.
    pub(super) fn sql(&self, sql: &str) -> AssertSqlSafe<String> {
        AssertSqlSafe(self.dialect_sql(sql).into_owned())
    }

    fn dialect_sql<'a>(&self, sql: &'a str) -> Cow<'a, str> {
        if self.dialect != Dialect::MySql {
            return Cow::Borrowed(sql);
        }
        let mut out = String::with_capacity(sql.len());
        let mut chars = sql.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
                while chars.peek().is_some_and(char::is_ascii_digit) {
                    chars.next();
                }
                out.push('?');
            } else {
                out.push(c);
            }
        }
        Cow::Owned(out)
    }

    /// SQLite transactions take the write lock up front: a deferred one that reads first and
    /// then writes fails at once ("database is locked") when Kamailio wrote in between, while
    /// BEGIN IMMEDIATE waits for the lock (busy timeout) like the other databases do.
    pub(super) async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.dialect {
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            _ => self.pool.begin().await,
        }
    }

    pub(super) fn err(&self, e: sqlx::Error) -> PbxError {
        classify(&self.target, e)
    }

    /// Fails with MissingTables naming every Kamailio table this backend needs and cannot see.
    pub async fn check_tables(&self) -> Result<()> {
        let mut missing = Vec::new();
        for table in [
            "subscriber",
            "usr_preferences",
            "grp",
            "dbaliases",
            "location",
            "version",
        ] {
            let q = format!("SELECT COUNT(*) FROM {table} WHERE 1 = 0");
            if let Err(e) = sqlx::query(AssertSqlSafe(q)).fetch_all(&self.pool).await {
                match classify(&self.target, e) {
                    PbxError::MissingTables { .. } => missing.push(table),
                    other => return Err(other),
                }
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(PbxError::MissingTables {
                target: self.target.clone(),
                missing: missing.join(", "),
            })
        }
    }

    /// Creates pbx-operator's own table if it is missing, and records it in Kamailio's `version`.
    pub async fn migrate(&self) -> Result<()> {
        let script = match self.dialect {
            Dialect::Postgres => include_str!("migrations/postgres.sql"),
            Dialect::Sqlite => include_str!("migrations/sqlite.sql"),
            Dialect::MySql => include_str!("migrations/mysql.sql"),
        };
        // One migration at a time in this process: reconciles that connect at the same moment
        // would otherwise race on CREATE TABLE IF NOT EXISTS and the version rows.
        static MIGRATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one = MIGRATING.lock().await;
        let mut conn = self.pool.acquire().await.map_err(|e| self.err(e))?;
        // Comments go first: one may hold a `;`.
        let script: String = script
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        for statement in script.split(';') {
            let statement = statement.to_string();
            if !statement.trim().is_empty() {
                sqlx::query(AssertSqlSafe(statement))
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| self.err(e))?;
            }
        }
        self.index_number_holders(&mut conn).await?;
        self.record_version(&mut conn, "pbx_phone").await?;
        self.record_version(&mut conn, "pbx_ledger").await?;
        self.record_version(&mut conn, "pbx_snapshot").await
    }

    /// Indexes Kamailio's usr_preferences by private number, for [`Db::number_holders_on`].
    /// Looked up before it is created: CREATE INDEX IF NOT EXISTS still needs the table's owner
    /// (and a lock that waits for every open write) on PostgreSQL. A login that may not create
    /// it gets a warning, not a failed connection: the index only makes number lookups fast.
    async fn index_number_holders(&self, conn: &mut AnyConnection) -> Result<()> {
        // Partial where the database has partial indexes: a write of any other preference
        // then adds nothing to it. MySQL indexes every preference's value.
        let (name, known, create) = match self.dialect {
            Dialect::Postgres => (
                "pbx_private_number_idx",
                "SELECT COUNT(*) FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'usr_preferences' AND indexname = 'pbx_private_number_idx'",
                "CREATE INDEX IF NOT EXISTS pbx_private_number_idx ON usr_preferences (value) WHERE attribute = 'pbx.private_number'",
            ),
            Dialect::Sqlite => (
                "pbx_private_number_idx",
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'pbx_private_number_idx'",
                "CREATE INDEX IF NOT EXISTS pbx_private_number_idx ON usr_preferences (value) WHERE attribute = 'pbx.private_number'",
            ),
            Dialect::MySql => (
                "pbx_usr_preferences_value_idx",
                "SELECT COUNT(*) FROM information_schema.statistics WHERE table_schema = DATABASE() AND table_name = 'usr_preferences' AND index_name = 'pbx_usr_preferences_value_idx'",
                "CREATE INDEX pbx_usr_preferences_value_idx ON usr_preferences (attribute, value)",
            ),
        };
        let known: i64 = sqlx::query(known)
            .fetch_one(&mut *conn)
            .await
            .and_then(|r| int(&r, 0))
            .map_err(|e| self.err(e))?;
        if known > 0 {
            return Ok(());
        }
        match sqlx::query(create)
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_transient() => Err(e),
            Err(e) => {
                tracing::warn!(
                    target = %self.target,
                    index = name,
                    statement = create,
                    error = %e,
                    "could not index usr_preferences by private number: number moves will scan every preference; run the statement as the table's owner"
                );
                Ok(())
            }
        }
    }

    /// Records one of pbx-operator's own tables in Kamailio's `version` table, once.
    async fn record_version(&self, conn: &mut AnyConnection, table: &str) -> Result<()> {
        let known: i64 =
            sqlx::query(self.sql("SELECT COUNT(*) FROM version WHERE table_name = $1"))
                .bind(table)
                .fetch_one(&mut *conn)
                .await
                .and_then(|r| int(&r, 0))
                .map_err(|e| self.err(e))?;
        if known == 0 {
            let inserted = sqlx::query(
                self.sql("INSERT INTO version (table_name, table_version) VALUES ($1, 1)"),
            )
            .bind(table)
            .execute(&mut *conn)
            .await;
            match inserted.map_err(|e| self.err(e)) {
                // Another connection (a reconcile starting at the same time) recorded it first.
                Ok(_) | Err(PbxError::Refused(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub async fn count_users(&self) -> Result<u64> {
        let row = sqlx::query(self.sql("SELECT COUNT(*) FROM subscriber WHERE domain = $1"))
            .bind(&self.domain)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(int(&row, 0).map_err(|e| self.err(e))? as u64)
    }

    /// Bindings of the tenant in usrloc's `location` table (`db_mode` 1: those ul.dump lists).
    pub async fn count_registrations(&self) -> Result<u64> {
        let row = sqlx::query(self.sql("SELECT COUNT(*) FROM location WHERE domain = $1"))
            .bind(&self.domain)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(int(&row, 0).map_err(|e| self.err(e))? as u64)
    }

    pub async fn read_users(&self, selection: &UserSelection) -> Result<UserRead> {
        let mut conn = self.pool.acquire().await.map_err(|e| self.err(e))?;
        self.read_users_on(&mut conn, selection).await
    }

    pub(super) async fn read_users_on(
        &self,
        conn: &mut AnyConnection,
        selection: &UserSelection,
    ) -> Result<UserRead> {
        self.read_users_only(conn, selection, None, None).await
    }

    /// Reads users with only `fields` (and their numbers), for plans that need no more.
    pub async fn read_user_fields(
        &self,
        selection: &UserSelection,
        fields: &[UserField],
    ) -> Result<UserRead> {
        let mut conn = self.pool.acquire().await.map_err(|e| self.err(e))?;
        self.read_users_only(&mut conn, selection, Some(fields), None)
            .await
    }

    /// Reads users with only `only` (all fields when None); with `stored`, also counts the
    /// preference rows each user has of each attribute read.
    async fn read_users_only(
        &self,
        conn: &mut AnyConnection,
        selection: &UserSelection,
        only: Option<&[UserField]>,
        mut stored: Option<&mut StoredRows>,
    ) -> Result<UserRead> {
        let wanted_field = |f: UserField| only.is_none_or(|o| o.contains(&f));
        let (mut wanted, empty_groups) = self.group_members(conn, &selection.groups).await?;
        wanted.extend(selection.extensions.iter().cloned());
        let wanted: Vec<String> = wanted.into_iter().collect();
        let mut users: BTreeMap<String, User> = BTreeMap::new();

        // Each statement's rows are taken as they arrive: a chunk is thousands of users and
        // several rows each, which as one result set would outweigh the users made of them.
        for chunk in wanted.chunks(self.read_chunk()) {
            let list = self.list_sql();
            let q = format!(
                "SELECT username, ha1 FROM subscriber WHERE domain = $1 AND username IN ({list})"
            );
            self.each_in_list(conn, &q, chunk, |row| {
                let extension = text(&row, 0)?;
                let ha1 = text(&row, 1)?;
                let mut user = User {
                    extension: extension.clone(),
                    ..Default::default()
                };
                for field in UserField::ALL.into_iter().filter(|f| wanted_field(*f)) {
                    if let Some(d) = schema::default_value(field) {
                        user.values.insert(field, d.to_string());
                    }
                }
                if !ha1.is_empty() && wanted_field(UserField::Password) {
                    user.values
                        .insert(UserField::Password, format!("ha1:{ha1}"));
                }
                users.insert(extension, user);
                Ok(())
            })
            .await?;
            let by_attribute: HashMap<&str, UserField> = UserField::ALL
                .into_iter()
                .filter(|f| wanted_field(*f))
                .filter_map(|f| match schema::storage(f) {
                    Storage::Attribute(a) => Some((a, f)),
                    _ => None,
                })
                .collect();
            // Only the attributes asked for: a plan of 3 fields reads 3 rows per user, not 20.
            // The names are the schema's constants, never user data.
            let attributes = match only {
                None => "attribute LIKE 'pbx.%'".to_string(),
                Some(_) => {
                    let names: Vec<String> =
                        by_attribute.keys().map(|a| format!("'{a}'")).collect();
                    format!("attribute IN ({})", names.join(", "))
                }
            };
            // Counted rows are locked until the write commits: the rows a write inserts
            // beside are known to be there (see [`Db::set_attributes_mysql`]).
            let lock = if stored.is_some() { " FOR UPDATE" } else { "" };
            let q = format!(
                "SELECT username, attribute, value FROM usr_preferences WHERE domain = $1 AND username IN ({list}) AND {attributes}{lock}"
            );
            if !by_attribute.is_empty() {
                self.each_in_list(conn, &q, chunk, |row| {
                    let (ext, attr, value) = (text(&row, 0)?, text(&row, 1)?, text(&row, 2)?);
                    if let (Some(user), Some((attribute, field))) = (
                        users.get_mut(&ext),
                        by_attribute.get_key_value(attr.as_str()),
                    ) {
                        user.values
                            .insert(*field, schema::canonical(*field, &value));
                        if let Some(stored) = stored.as_deref_mut() {
                            *stored.entry((ext, *attribute)).or_default() += 1;
                        }
                    }
                    Ok(())
                })
                .await?;
            }
            if wanted_field(UserField::Groups) {
                let q = format!(
                    "SELECT username, grp FROM grp WHERE domain = $1 AND username IN ({list}) ORDER BY grp"
                );
                let mut groups: HashMap<String, Vec<String>> = HashMap::new();
                self.each_in_list(conn, &q, chunk, |row| {
                    groups
                        .entry(text(&row, 0)?)
                        .or_default()
                        .push(text(&row, 1)?);
                    Ok(())
                })
                .await?;
                for (ext, list) in groups {
                    if let Some(user) = users.get_mut(&ext) {
                        user.values.insert(UserField::Groups, list.join(","));
                    }
                }
            }
            let q = format!(
                "SELECT username, alias_username FROM dbaliases WHERE domain = $1 AND username IN ({list}) ORDER BY id"
            );
            self.each_in_list(conn, &q, chunk, |row| {
                let ext = text(&row, 0)?;
                if let Some(user) = users.get_mut(&ext) {
                    user.numbers.push(text(&row, 1)?);
                }
                Ok(())
            })
            .await?;
        }
        for user in users.values_mut() {
            if let Some(primary) = user.numbers.first() {
                user.values
                    .insert(UserField::PrimaryNumber, primary.clone());
            }
        }
        let unknown_extensions = selection
            .extensions
            .iter()
            .filter(|e| !users.contains_key(*e))
            .cloned()
            .collect();
        Ok(UserRead {
            users: users.into_values().collect(),
            unknown_extensions,
            empty_groups,
        })
    }

    /// The members of `groups`, and the groups that have none.
    async fn group_members(
        &self,
        conn: &mut AnyConnection,
        groups: &[String],
    ) -> Result<(BTreeSet<String>, Vec<String>)> {
        let mut members = BTreeSet::new();
        let mut with_members = BTreeSet::new();
        for chunk in groups.chunks(CHUNK) {
            let q = format!(
                "SELECT username, grp FROM grp WHERE domain = $1 AND grp IN ({})",
                placeholders(2, chunk.len())
            );
            let mut query = sqlx::query(self.sql(&q)).bind(&self.domain);
            for g in chunk {
                query = query.bind(g);
            }
            let mut rows = query.fetch(&mut *conn);
            while let Some(row) = rows.try_next().await.map_err(|e| self.err(e))? {
                members.insert(text(&row, 0).map_err(|e| self.err(e))?);
                with_members.insert(text(&row, 1).map_err(|e| self.err(e))?);
            }
        }
        let empty = groups
            .iter()
            .filter(|g| !with_members.contains(*g))
            .cloned()
            .collect();
        Ok((members, empty))
    }

    /// The extensions `selection` names that exist, nothing of the users read. A long list is
    /// checked against the domain's usernames in one streamed query, not hundreds of IN lists.
    pub async fn select_users(&self, selection: &UserSelection) -> Result<Selected> {
        let mut conn = self.pool.acquire().await.map_err(|e| self.err(e))?;
        let (mut wanted, empty_groups) = self.group_members(&mut conn, &selection.groups).await?;
        wanted.extend(selection.extensions.iter().cloned());
        let mut extensions = Vec::with_capacity(wanted.len());
        if wanted.len() > 10 * CHUNK {
            let q = "SELECT username FROM subscriber WHERE domain = $1";
            let mut rows = sqlx::query(self.sql(q))
                .bind(&self.domain)
                .fetch(&mut *conn);
            while let Some(row) = rows.try_next().await.map_err(|e| self.err(e))? {
                let extension = text(&row, 0).map_err(|e| self.err(e))?;
                // Moved out of `wanted`: one copy of the selection in memory, not two.
                if let Some(e) = wanted.take(&extension) {
                    extensions.push(e);
                }
            }
        } else {
            let wanted: Vec<String> = wanted.into_iter().collect();
            for chunk in wanted.chunks(CHUNK) {
                let q = format!(
                    "SELECT username FROM subscriber WHERE domain = $1 AND username IN ({})",
                    placeholders(2, chunk.len())
                );
                for row in self.fetch_in(&mut conn, &q, chunk).await? {
                    extensions.push(text(&row, 0).map_err(|e| self.err(e))?);
                }
            }
        }
        let listed: BTreeSet<&str> = selection.extensions.iter().map(String::as_str).collect();
        let found: BTreeSet<&str> = extensions
            .iter()
            .map(String::as_str)
            .filter(|e| listed.contains(e))
            .collect();
        let unknown_extensions = selection
            .extensions
            .iter()
            .filter(|e| !found.contains(e.as_str()))
            .cloned()
            .collect();
        Ok(Selected {
            extensions,
            unknown_extensions,
            empty_groups,
        })
    }

    /// Users per read: every database takes a batch's list as one JSON parameter (one statement
    /// per table, not one per 500 users with 500 placeholders).
    fn read_chunk(&self) -> usize {
        8 * CHUNK
    }

    /// The list at $2 of a query: the elements of one JSON parameter (see [`Db::fetch_list`]).
    /// MariaDB materializes JSON_TABLE's rows and probes the table's index per user.
    fn list_sql(&self) -> &'static str {
        match self.dialect {
            Dialect::Postgres => "SELECT jsonb_array_elements_text($2::jsonb)",
            Dialect::Sqlite => "SELECT value FROM json_each($2)",
            Dialect::MySql => {
                "SELECT u FROM JSON_TABLE($2, '$[*]' COLUMNS (u VARCHAR(255) PATH '$')) AS j"
            }
        }
    }

    /// Runs `q`, whose list is [`Db::list_sql`], with the domain as $1 and `values` as the list.
    async fn fetch_list(
        &self,
        conn: &mut AnyConnection,
        q: &str,
        values: &[String],
    ) -> Result<Vec<AnyRow>> {
        let mut rows = Vec::new();
        self.each_in_list(conn, q, values, |row| {
            rows.push(row);
            Ok(())
        })
        .await?;
        Ok(rows)
    }

    /// Runs `q` like [`Db::fetch_list`], handing each row to `each` as it arrives.
    async fn each_in_list(
        &self,
        conn: &mut AnyConnection,
        q: &str,
        values: &[String],
        mut each: impl FnMut(AnyRow) -> std::result::Result<(), sqlx::Error>,
    ) -> Result<()> {
        let list = serde_json::to_string(values).expect("strings serialize");
        let mut rows = sqlx::query(self.sql(q))
            .bind(&self.domain)
            .bind(list)
            .fetch(&mut *conn);
        while let Some(row) = rows.try_next().await.map_err(|e| self.err(e))? {
            each(row).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Runs `q` with the domain as $1 and `values` as $2.. .
    async fn fetch_in(
        &self,
        conn: &mut AnyConnection,
        q: &str,
        values: &[String],
    ) -> Result<Vec<AnyRow>> {
        let mut query = sqlx::query(self.sql(q)).bind(&self.domain);
        for v in values {
            query = query.bind(v);
        }
        query.fetch_all(&mut *conn).await.map_err(|e| self.err(e))
    }

    /// The stored forms of the secrets `changes` write, made before any transaction opens: a
    /// PIN's hash is slow on purpose (see [`super::pin`]), and no database lock waits for it.
    async fn stored_secrets(&self, changes: &[UserChange]) -> Result<StoredSecrets> {
        let work: Vec<(String, UserField, Secret)> = changes
            .iter()
            .flat_map(|c| {
                c.writes.iter().filter_map(|w| match &w.to {
                    NewValue::Secret(s) => Some((c.extension.clone(), w.field, s.clone())),
                    _ => None,
                })
            })
            .collect();
        if work.is_empty() {
            return Ok(StoredSecrets::new());
        }
        let domain = self.domain.clone();
        tokio::task::spawn_blocking(move || {
            // On every core: a bulk PIN change is hashing-bound.
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let per_thread = work.len().div_ceil(threads);
            std::thread::scope(|scope| {
                let parts: Vec<_> = work
                    .chunks(per_thread)
                    .map(|part| {
                        let domain = &domain;
                        scope.spawn(move || {
                            part.iter()
                                .map(|(ext, field, secret)| {
                                    let stored = stored_secret(domain, ext, *field, secret);
                                    ((ext.clone(), *field), stored)
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                parts
                    .into_iter()
                    .flat_map(|p| p.join().expect("hashing a secret does not panic"))
                    .collect::<StoredSecrets>()
            })
        })
        .await
        .map_err(|e| PbxError::Database(format!("hashing the secrets to store failed: {e}")))
    }

    pub async fn apply_user_changes(
        &self,
        changes: &[UserChange],
        atomic: bool,
    ) -> Result<Vec<WriteOutcome>> {
        if atomic {
            let secrets = self.stored_secrets(changes).await?;
            let mut tx = self.begin().await.map_err(|e| self.err(e))?;
            // One pass over all users: reads and writes chunk their lists internally.
            let written = match self.compare_and_write(&mut tx, changes, &secrets).await {
                Ok(outcomes) if outcomes.iter().all(|o| *o == WriteOutcome::Applied) => tx
                    .commit()
                    .await
                    .map_err(|e| self.err(e))
                    .map(|()| outcomes),
                Ok(mut outcomes) => {
                    tx.rollback().await.map_err(|e| self.err(e))?;
                    roll_back(&mut outcomes);
                    return Ok(outcomes);
                }
                Err(e) => {
                    let _ = tx.rollback().await;
                    Err(e)
                }
            };
            return match written {
                Ok(outcomes) => Ok(outcomes),
                // The database refused something in a bulk statement: find out whose data it
                // is by replaying the users one by one, then roll everything back.
                Err(PbxError::Refused(_)) => self.apply_atomic_one_by_one(changes, &secrets).await,
                // Down, busy, or misconfigured (tables, permissions): the run waits or stalls;
                // no target is failed for it.
                Err(e) => Err(e),
            };
        }
        let mut outcomes = Vec::with_capacity(changes.len());
        let mut chunks = changes.chunks(WRITE_CHUNK).peekable();
        while let Some(first) = chunks.next() {
            let beside = match self.write_lanes() {
                1 => None,
                _ => chunks.next_if(|next| independent(first, next)),
            };
            let Some(second) = beside else {
                outcomes.extend(self.write_chunk(first).await?);
                continue;
            };
            let (a, b) = tokio::join!(self.write_chunk(first), self.write_chunk(second));
            for (chunk, written) in [(first, a), (second, b)] {
                match written {
                    Ok(o) => outcomes.extend(o),
                    // Rolled back whole for a lock: a deadlock's victim (two transactions can
                    // still meet at the gap between their users, as InnoDB locks the gap before
                    // a row it reads for update) or a lock wait timed out. It runs again alone.
                    Err(PbxError::DatabaseBusy { detail, .. }) => {
                        tracing::info!(error = %detail, "a chunk written beside another one was rolled back by the database; written again alone");
                        outcomes.extend(self.write_chunk(chunk).await?)
                    }
                    // The other chunk may have committed: the caller's resume check finds its
                    // users written, as it does for chunks before a failing one.
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(outcomes)
    }

    /// Continue chunks in flight at once: two where the database takes concurrent writers and
    /// the pool has a connection for each. Per chunk, MariaDB spends about as long on the
    /// compare-and-set read, the commit and the round trips as on writing the rows; a second
    /// transaction overlaps them. SQLite has a single writer.
    fn write_lanes(&self) -> usize {
        match self.dialect {
            Dialect::Sqlite => 1,
            _ => self.pool.options().get_max_connections().min(2) as usize,
        }
    }

    /// Writes one Continue chunk in its own transaction; should the database refuse a row, it
    /// writes the chunk again user by user, so that only that user fails.
    async fn write_chunk(&self, chunk: &[UserChange]) -> Result<Vec<WriteOutcome>> {
        let secrets = self.stored_secrets(chunk).await?;
        match self.write_committed(chunk, &secrets).await {
            Ok(outcomes) => Ok(outcomes),
            Err(e) if !matches!(e, PbxError::Refused(_)) => Err(e),
            Err(_) => {
                let mut outcomes = Vec::with_capacity(chunk.len());
                for change in chunk {
                    match self
                        .write_committed(std::slice::from_ref(change), &secrets)
                        .await
                    {
                        Ok(mut o) => outcomes.push(o.remove(0)),
                        // Users before it are committed and recorded by the caller's resume
                        // check; the rest wait for the database.
                        Err(e) if e.is_transient() => return Err(e),
                        Err(e) => outcomes.push(WriteOutcome::Failed(redacted(&e, &secrets))),
                    }
                }
                Ok(outcomes)
            }
        }
    }

    /// [`Db::compare_and_write`] in a transaction of its own, committed (a refusal at commit,
    /// such as a deferred constraint, is an error like one at a statement).
    async fn write_committed(
        &self,
        changes: &[UserChange],
        secrets: &StoredSecrets,
    ) -> Result<Vec<WriteOutcome>> {
        let mut tx = self.begin().await.map_err(|e| self.err(e))?;
        let outcomes = match self.compare_and_write(&mut tx, changes, secrets).await {
            Ok(o) => o,
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(e);
            }
        };
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(outcomes)
    }

    /// An Atomic batch the database refused: replays it user by user in one transaction, each
    /// user behind a savepoint, so every user whose data is refused is named with the database's
    /// message (Failed) while the others report RolledBack. Commits only if, this time, every
    /// user applied (the refusal did not recur).
    async fn apply_atomic_one_by_one(
        &self,
        changes: &[UserChange],
        secrets: &StoredSecrets,
    ) -> Result<Vec<WriteOutcome>> {
        let mut tx = self.begin().await.map_err(|e| self.err(e))?;
        let (mut outcomes, alive) = self.replay_one_by_one(&mut tx, changes, secrets).await?;
        if !alive {
            drop(tx);
            roll_back(&mut outcomes);
            return Ok(outcomes);
        }
        if outcomes.iter().all(|o| *o == WriteOutcome::Applied) {
            match tx.commit().await.map_err(|e| self.err(e)) {
                Ok(()) => {}
                Err(e) if e.is_transient() => return Err(e),
                // Refused at commit (a deferred constraint): it names no one target.
                Err(e) => outcomes.fill(WriteOutcome::Failed(redacted(&e, secrets))),
            }
        } else {
            tx.rollback().await.map_err(|e| self.err(e))?;
            roll_back(&mut outcomes);
        }
        Ok(outcomes)
    }

    /// Applies `changes` one by one inside `conn`'s transaction, each behind a savepoint: a
    /// user whose data the database refuses is Failed with its message, the rest apply. Also
    /// returns whether the transaction is still usable: a refusal that ends it (SQLite's
    /// RAISE(ROLLBACK)) leaves the users after it RolledBack, untried.
    async fn replay_one_by_one(
        &self,
        conn: &mut AnyConnection,
        changes: &[UserChange],
        secrets: &StoredSecrets,
    ) -> Result<(Vec<WriteOutcome>, bool)> {
        let mut outcomes = Vec::with_capacity(changes.len());
        for change in changes {
            let mut savepoint = sqlx::Connection::begin(&mut *conn)
                .await
                .map_err(|e| self.err(e))?;
            match self
                .compare_and_write(&mut savepoint, std::slice::from_ref(change), secrets)
                .await
            {
                Ok(mut o) => {
                    savepoint.commit().await.map_err(|e| self.err(e))?;
                    outcomes.push(o.remove(0));
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    let message = redacted(&e, secrets);
                    tracing::info!(extension = %change.extension, error = %message, "the database refused a target of an Atomic change");
                    outcomes.push(WriteOutcome::Failed(message));
                    if savepoint.rollback().await.is_err() {
                        outcomes.resize(changes.len(), WriteOutcome::RolledBack);
                        return Ok((outcomes, false));
                    }
                }
            }
        }
        Ok((outcomes, true))
    }

    /// Within one transaction: re-reads the users (and whoever holds a number being given), then
    /// takes the changes in order, each checked against the state the ones before it leave:
    /// a change applies only if its `from` values still hold and every number it sets is free
    /// or held by a user it names in `takes`. Then writes what differs.
    async fn compare_and_write(
        &self,
        conn: &mut AnyConnection,
        changes: &[UserChange],
        secrets: &StoredSecrets,
    ) -> Result<Vec<WriteOutcome>> {
        let given: Vec<String> = changes
            .iter()
            .flat_map(|c| c.writes.iter().filter_map(given_number))
            .map(str::to_string)
            .collect();
        let mut extensions: Vec<String> = changes.iter().map(|c| c.extension.clone()).collect();
        if !given.is_empty() {
            extensions.extend(
                self.number_holders_on(conn, &given)
                    .await?
                    .into_iter()
                    .map(|(_, holder)| holder),
            );
        }
        extensions.sort();
        extensions.dedup();
        let selection = UserSelection {
            groups: vec![],
            extensions,
        };
        // Only the written fields are compared and written, unless a number is: a number
        // write touches the user's (and a holder's) other number fields, so then all is read.
        let written: BTreeSet<UserField> = changes
            .iter()
            .flat_map(|c| c.writes.iter().map(|w| w.field))
            .collect();
        let numbers = written.iter().any(|f| f.is_number());
        let written: Vec<UserField> = written.into_iter().collect();
        let only = (!numbers).then_some(written.as_slice());
        // MySQL updates rows in place and inserts only where a user has none: which users
        // have rows is counted by the read (see [`Db::set_attributes_mysql`]).
        let mut stored_rows = StoredRows::new();
        let counting = (self.dialect == Dialect::MySql).then_some(&mut stored_rows);
        let current = self
            .read_users_only(conn, &selection, only, counting)
            .await?;
        let mut dir = Directory::new(current.users);
        let stored = |e: &str, f: UserField, s: &Secret| match secrets.get(&(e.to_string(), f)) {
            Some(v) => v.clone(),
            None => stored_secret(&self.domain, e, f, s),
        };
        let mut passwords: HashMap<String, Secret> = HashMap::new();
        let mut outcomes = Vec::with_capacity(changes.len());
        for change in changes {
            let ext = change.extension.as_str();
            let Some(user) = dir.get(ext) else {
                outcomes.push(WriteOutcome::NotFound);
                continue;
            };
            if let Some(w) = change
                .writes
                .iter()
                .find(|w| user.get(w.field) != w.from.as_deref())
            {
                outcomes.push(WriteOutcome::Conflict {
                    field: w.field,
                    expected: w.from.clone(),
                    found: user.get(w.field).map(str::to_string),
                });
                continue;
            }
            let held = change.writes.iter().find_map(|w| {
                let n = given_number(w)?;
                let holder = dir.holder_other_than(n, ext)?;
                let planned = change
                    .takes
                    .iter()
                    .any(|t| t.number == n && t.holder == holder);
                (!planned).then(|| WriteOutcome::NumberHeld {
                    field: w.field,
                    number: n.to_string(),
                    holder: holder.to_string(),
                })
            });
            if let Some(o) = held {
                outcomes.push(o);
                continue;
            }
            if change
                .writes
                .iter()
                .any(|w| w.field == UserField::Password && !matches!(w.to, NewValue::Secret(_)))
            {
                outcomes.push(WriteOutcome::Failed(
                    "a password can only be set from a Secret".into(),
                ));
                continue;
            }
            for w in &change.writes {
                if let (UserField::Password, NewValue::Secret(s)) = (w.field, &w.to) {
                    passwords.insert(ext.to_string(), s.clone());
                }
                for m in dir.apply(ext, w.field, &w.to, &stored) {
                    tracing::info!(number = %m.number, from = %m.holder, to = ext, "number moved");
                }
            }
            outcomes.push(WriteOutcome::Applied);
        }
        self.write_changed(conn, &dir, &passwords, &stored_rows)
            .await?;
        Ok(outcomes)
    }

    /// Who holds each of `numbers`: as a routing alias (dbaliases) or as the private number.
    /// The private numbers are found through the index [`Db::index_number_holders`] creates:
    /// Kamailio indexes usr_preferences by user only, and a scan of every preference per list
    /// made a 100,000-row CSV spend most of its Validate here.
    pub(super) async fn number_holders_on(
        &self,
        conn: &mut AnyConnection,
        numbers: &[String],
    ) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        let list = self.list_sql();
        for chunk in numbers.chunks(self.read_chunk()) {
            for q in [
                format!(
                    "SELECT alias_username, username FROM dbaliases WHERE domain = $1 AND alias_username IN ({list})"
                ),
                format!(
                    "SELECT value, username FROM usr_preferences WHERE domain = $1 AND attribute = 'pbx.private_number' AND value IN ({list})"
                ),
            ] {
                for row in self.fetch_list(conn, &q, chunk).await? {
                    out.push((
                        text(&row, 0).map_err(|e| self.err(e))?,
                        text(&row, 1).map_err(|e| self.err(e))?,
                    ));
                }
            }
        }
        Ok(out)
    }

    pub async fn number_holders(&self, numbers: &[String]) -> Result<Vec<(String, String)>> {
        let mut conn = self.pool.acquire().await.map_err(|e| self.err(e))?;
        self.number_holders_on(&mut conn, numbers).await
    }

    /// Every extension of the tenant, in extension order.
    pub async fn extensions(&self) -> Result<Vec<String>> {
        let rows = sqlx::query(self.sql("SELECT username FROM subscriber WHERE domain = $1"))
            .bind(&self.domain)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        let mut out = rows
            .iter()
            .map(|r| text(r, 0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        out.sort_by(|a, b| crate::pbx::extension_order(a, b));
        Ok(out)
    }

    /// The policy names of the tenant: the pbx_policy catalogue, and names users already have
    /// (so a PBX whose catalogue is still empty does not refuse what it runs with today).
    pub async fn policies(&self) -> Result<Policies> {
        let mut p = Policies::default();
        let q = "SELECT kind, name FROM pbx_policy WHERE domain = $1 OR domain = '' UNION SELECT attribute, value FROM usr_preferences WHERE domain = $2 AND attribute IN ('pbx.caller_id_policy', 'pbx.voice_route_policy')";
        let rows = sqlx::query(self.sql(q))
            .bind(&self.domain)
            .bind(&self.domain)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        for row in rows {
            let kind = text(&row, 0).map_err(|e| self.err(e))?;
            let name = text(&row, 1).map_err(|e| self.err(e))?;
            match kind.as_str() {
                "callerId" | "pbx.caller_id_policy" => p.caller_id.insert(name),
                "voiceRoute" | "pbx.voice_route_policy" => p.voice_route.insert(name),
                _ => false,
            };
        }
        Ok(p)
    }

    /// Writes what differs between each changed user as read and as it is now.
    async fn write_changed(
        &self,
        conn: &mut AnyConnection,
        dir: &Directory,
        passwords: &HashMap<String, Secret>,
        stored: &StoredRows,
    ) -> Result<()> {
        let mut changed: Vec<(&User, &User)> = dir.changed().collect();
        changed.sort_by(|a, b| a.1.extension.cmp(&b.1.extension));
        let mut attributes: BTreeMap<&'static str, Vec<(&str, Option<String>)>> = BTreeMap::new();
        let mut groups: Vec<(&str, Vec<String>)> = Vec::new();
        let mut aliases: Vec<(&str, &[String])> = Vec::new();
        for (before, now) in changed {
            let ext = now.extension.as_str();
            for field in UserField::ALL {
                let value = now.get(field);
                if before.get(field) == value {
                    continue;
                }
                match schema::storage(field) {
                    Storage::Attribute(attr) => attributes
                        .entry(attr)
                        .or_default()
                        .push((ext, value.map(|v| schema::stored(field, v)))),
                    Storage::SubscriberHa1 => {
                        if let Some(s) = passwords.get(ext) {
                            self.set_password(conn, ext, s).await?
                        }
                    }
                    Storage::GroupRows => groups.push((
                        ext,
                        value
                            .unwrap_or("")
                            .split(',')
                            .map(str::trim)
                            .filter(|g| !g.is_empty())
                            .map(str::to_string)
                            .collect(),
                    )),
                    // Written with the whole number list below.
                    Storage::PrimaryAlias => {}
                }
            }
            if before.numbers != now.numbers {
                aliases.push((ext, &now.numbers));
            }
        }
        if self.dialect == Dialect::MySql {
            self.set_attributes_mysql(conn, &attributes, Some(stored))
                .await?;
        } else {
            for (attribute, rows) in &attributes {
                self.replace_attribute(conn, attribute, rows).await?;
            }
        }
        if !groups.is_empty() {
            let exts: Vec<String> = groups.iter().map(|(e, _)| e.to_string()).collect();
            self.delete_rows_of(conn, "grp", &exts).await?;
            let rows: Vec<(&str, &str)> = groups
                .iter()
                .flat_map(|(e, gs)| gs.iter().map(move |g| (*e, g.as_str())))
                .collect();
            for chunk in rows.chunks(CHUNK) {
                let values = tuples(chunk.len(), 3, |p| format!("({p}, CURRENT_TIMESTAMP)"));
                let q = format!(
                    "INSERT INTO grp (username, domain, grp, last_modified) VALUES {values}"
                );
                let mut query = sqlx::query(self.sql(&q));
                for (e, g) in chunk {
                    query = query.bind(*e).bind(&self.domain).bind(*g);
                }
                query.execute(&mut *conn).await.map_err(|e| self.err(e))?;
            }
        }
        if !aliases.is_empty() {
            // The primary number is the first alias by id, so a user's list is written anew in order.
            let exts: Vec<String> = aliases.iter().map(|(e, _)| e.to_string()).collect();
            self.delete_rows_of(conn, "dbaliases", &exts).await?;
            let rows: Vec<(&str, &str)> = aliases
                .iter()
                .flat_map(|(e, ns)| ns.iter().map(move |n| (*e, n.as_str())))
                .collect();
            for chunk in rows.chunks(CHUNK) {
                let values = tuples(chunk.len(), 4, |p| format!("({p})"));
                let q = format!(
                    "INSERT INTO dbaliases (alias_username, alias_domain, username, domain) VALUES {values}"
                );
                let mut query = sqlx::query(self.sql(&q));
                for (e, n) in chunk {
                    query = query
                        .bind(*n)
                        .bind(&self.domain)
                        .bind(*e)
                        .bind(&self.domain);
                }
                query.execute(&mut *conn).await.map_err(|e| self.err(e))?;
            }
        }
        Ok(())
    }

    /// Deletes every row of `table` (grp, dbaliases: tables keyed by username and domain) of the
    /// given users, one statement per chunk.
    async fn delete_rows_of(
        &self,
        conn: &mut AnyConnection,
        table: &'static str,
        extensions: &[String],
    ) -> Result<()> {
        for chunk in extensions.chunks(CHUNK) {
            let q = format!(
                "DELETE FROM {table} WHERE domain = $1 AND username IN ({})",
                placeholders(2, chunk.len())
            );
            self.execute_in(conn, &q, chunk).await?;
        }
        Ok(())
    }

    /// Sets one attribute for many users: on PostgreSQL and SQLite one DELETE and one INSERT,
    /// each taking the users as one JSON parameter; on MySQL see [`Db::set_attributes_mysql`].
    pub(super) async fn replace_attribute(
        &self,
        conn: &mut AnyConnection,
        attribute: &'static str,
        rows: &[(&str, Option<String>)],
    ) -> Result<()> {
        if self.dialect == Dialect::MySql {
            let one = BTreeMap::from([(attribute, rows.to_vec())]);
            return self.set_attributes_mysql(conn, &one, None).await;
        }
        // One DELETE for all users, the list as one JSON parameter: PostgreSQL may plan this
        // DELETE on the (uuid, attribute) index, which walks every row of the attribute, so one
        // statement per 500 users made a 10,000-user write quadratic.
        if !rows.is_empty() {
            let names: Vec<&str> = rows.iter().map(|(e, _)| *e).collect();
            let list = serde_json::to_string(&names).expect("strings serialize");
            let q = match self.dialect {
                // A join, so the plan probes the (username, domain, attribute) index per user.
                Dialect::Postgres => {
                    "DELETE FROM usr_preferences p USING jsonb_array_elements_text($3::jsonb) AS v(username) WHERE p.domain = $1 AND p.attribute = $2 AND p.username = v.username"
                }
                _ => {
                    "DELETE FROM usr_preferences WHERE domain = $1 AND attribute = $2 AND username IN (SELECT value FROM json_each($3))"
                }
            };
            sqlx::query(self.sql(q))
                .bind(&self.domain)
                .bind(attribute)
                .bind(list)
                .execute(&mut *conn)
                .await
                .map_err(|e| self.err(e))?;
        }
        // And one INSERT for all users from a JSON list of [username, value] pairs: one
        // statement per attribute and batch, not one per 500 users with 2,000 parameters.
        let set = values_set(rows);
        if set.is_empty() {
            return Ok(());
        }
        let list = serde_json::to_string(&set).expect("strings serialize");
        let q = match self.dialect {
            Dialect::Postgres => {
                "INSERT INTO usr_preferences (username, domain, attribute, type, value, last_modified) SELECT v.pair->>0, $1, $2, 2, v.pair->>1, CURRENT_TIMESTAMP FROM jsonb_array_elements($3::jsonb) AS v(pair)"
            }
            _ => {
                "INSERT INTO usr_preferences (username, domain, attribute, type, value, last_modified) SELECT json_extract(value, '$[0]'), $1, $2, 2, json_extract(value, '$[1]'), CURRENT_TIMESTAMP FROM json_each($3)"
            }
        };
        sqlx::query(self.sql(q))
            .bind(&self.domain)
            .bind(attribute)
            .bind(list)
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// MariaDB/MySQL: one statement per kind of write for all the attributes, the (user,
    /// attribute, value) rows as one JSON parameter read by JSON_TABLE: cleared values deleted,
    /// rows that exist updated in place, missing rows inserted. An UPDATE touches the value's row
    /// and its entry in the (attribute, value) index; DELETE and INSERT per 500 users rewrote
    /// every row and all its indexes (the write phase was 6x the one-UPDATE floor), and a
    /// statement per attribute tripled the statements of a batch.
    ///
    /// With `stored` (the rows the compare-and-set read counted in this transaction), the INSERT
    /// takes only the users that had no row, and is skipped when all had one: probing every user
    /// for a row it has was a third of the write. The read locked the rows it counted (FOR
    /// UPDATE), so none can go before the commit; should the UPDATE still match another number
    /// of rows, every user is probed.
    async fn set_attributes_mysql(
        &self,
        conn: &mut AnyConnection,
        attributes: &BTreeMap<&'static str, Vec<(&str, Option<String>)>>,
        stored: Option<&StoredRows>,
    ) -> Result<()> {
        // A JSON list of [username, attribute, value] rows at placeholder `at`, as rows v(u, a, val).
        let rows_at = |at: usize| {
            format!(
                "JSON_TABLE(${at}, '$[*]' COLUMNS (u VARCHAR(255) PATH '$[0]', a VARCHAR(255) PATH '$[1]', val VARCHAR(255) PATH '$[2]')) AS v"
            )
        };
        let mut cleared: Vec<(&str, &str)> = Vec::new();
        let mut set: Vec<(&str, &str, &str)> = Vec::new();
        for (attribute, rows) in attributes {
            for (ext, value) in rows {
                match value {
                    None => cleared.push((ext, attribute)),
                    Some(v) => set.push((ext, attribute, v)),
                }
            }
        }
        if !cleared.is_empty() {
            let q = format!(
                "DELETE p FROM usr_preferences p JOIN {} ON p.username = v.u AND p.attribute = v.a WHERE p.domain = $2",
                rows_at(1)
            );
            sqlx::query(self.sql(&q))
                .bind(serde_json::to_string(&cleared).expect("strings serialize"))
                .bind(&self.domain)
                .execute(&mut *conn)
                .await
                .map_err(|e| self.err(e))?;
        }
        if set.is_empty() {
            return Ok(());
        }
        let rows = serde_json::to_string(&set).expect("strings serialize");
        let q = format!(
            "UPDATE usr_preferences p JOIN {} ON p.username = v.u AND p.attribute = v.a SET p.value = v.val, p.type = 2, p.last_modified = CURRENT_TIMESTAMP WHERE p.domain = $2",
            rows_at(1)
        );
        // sqlx connects with CLIENT_FOUND_ROWS: rows matched, not only those whose value differed.
        let matched = sqlx::query(self.sql(&q))
            .bind(&rows)
            .bind(&self.domain)
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?
            .rows_affected();
        if let Some(stored) = stored {
            let had =
                |e: &str, a: &'static str| stored.get(&(e.to_string(), a)).copied().unwrap_or(0);
            let counted: u64 = set.iter().map(|(e, a, _)| u64::from(had(e, a))).sum();
            if matched == counted {
                set.retain(|(e, a, _)| had(e, a) == 0);
                if set.is_empty() {
                    return Ok(());
                }
            }
        }
        let rows = serde_json::to_string(&set).expect("strings serialize");
        // MySQL numbers placeholders by position: the JSON is bound second here.
        let q = format!(
            "INSERT INTO usr_preferences (username, domain, attribute, type, value, last_modified) SELECT v.u, $1, v.a, 2, v.val, CURRENT_TIMESTAMP FROM {} WHERE NOT EXISTS (SELECT 1 FROM usr_preferences p WHERE p.username = v.u AND p.domain = $3 AND p.attribute = v.a)",
            rows_at(2)
        );
        sqlx::query(self.sql(&q))
            .bind(&self.domain)
            .bind(&rows)
            .bind(&self.domain)
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub(super) async fn set_password(
        &self,
        conn: &mut AnyConnection,
        extension: &str,
        secret: &Secret,
    ) -> Result<()> {
        let ha1 = md5_hex(&format!("{extension}:{}:{}", self.domain, secret.expose()));
        let ha1b = md5_hex(&format!(
            "{extension}@{}:{}:{}",
            self.domain,
            self.domain,
            secret.expose()
        ));
        sqlx::query(self.sql("UPDATE subscriber SET ha1 = $1, ha1b = $2, password = '' WHERE username = $3 AND domain = $4"))
            .bind(ha1)
            .bind(ha1b)
            .bind(extension)
            .bind(&self.domain)
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn execute_in(
        &self,
        conn: &mut AnyConnection,
        q: &str,
        values: &[String],
    ) -> Result<u64> {
        let mut query = sqlx::query(self.sql(q)).bind(&self.domain);
        for v in values {
            query = query.bind(v);
        }
        Ok(query
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?
            .rows_affected())
    }

    /// Runs actions user by user, each in its own transaction, so one failure stays one failure.
    pub async fn apply_actions(
        &self,
        actions: &[(String, UserAction)],
    ) -> Result<Vec<ActionOutcome>> {
        let mut outcomes = Vec::with_capacity(actions.len());
        for (extension, action) in actions {
            let mut tx = self.begin().await.map_err(|e| self.err(e))?;
            let sel = UserSelection {
                groups: vec![],
                extensions: vec![extension.clone()],
            };
            let read = self.read_users_on(&mut tx, &sel).await?;
            let Some(user) = read.users.first() else {
                outcomes.push(ActionOutcome::NotFound);
                continue;
            };
            let outcome = match self.action_on(&mut tx, user, action).await {
                Ok(o) => o,
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => ActionOutcome::Failed(e.to_string()),
            };
            if matches!(outcome, ActionOutcome::Done) {
                tx.commit().await.map_err(|e| self.err(e))?;
            }
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    async fn action_on(
        &self,
        conn: &mut AnyConnection,
        user: &User,
        action: &UserAction,
    ) -> Result<ActionOutcome> {
        let ext = user.extension.as_str();
        let set = |field: UserField, value: &str| (ext, Some(schema::stored(field, value)));
        match action {
            UserAction::ResetPassword(secret) => {
                self.set_password(conn, ext, secret).await?;
                self.replace_attribute(
                    conn,
                    "pbx.status",
                    &[set(UserField::Status, "PasswordRequired")],
                )
                .await?;
            }
            UserAction::ResetTwoFactor => {
                let q = "DELETE FROM usr_preferences WHERE domain = $1 AND username = $2 AND attribute = $3";
                let n = sqlx::query(self.sql(q))
                    .bind(&self.domain)
                    .bind(ext)
                    .bind(TWO_FACTOR_ATTRIBUTE)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| self.err(e))?
                    .rows_affected();
                if n == 0 {
                    return Ok(ActionOutcome::Unchanged);
                }
            }
            UserAction::Lock | UserAction::Unlock => {
                let want = if matches!(action, UserAction::Lock) {
                    "true"
                } else {
                    "false"
                };
                if user.get(UserField::Locked) == Some(want) {
                    return Ok(ActionOutcome::Unchanged);
                }
                self.replace_attribute(conn, "pbx.locked", &[set(UserField::Locked, want)])
                    .await?;
            }
            UserAction::Remove => {
                if !user.numbers.is_empty() {
                    return Ok(ActionOutcome::Skipped(format!(
                        "owns {} numbers: reassign them first",
                        user.numbers.len()
                    )));
                }
                let one = vec![ext.to_string()];
                self.execute_in(
                    conn,
                    "DELETE FROM usr_preferences WHERE domain = $1 AND username IN ($2)",
                    &one,
                )
                .await?;
                self.execute_in(
                    conn,
                    "DELETE FROM grp WHERE domain = $1 AND username IN ($2)",
                    &one,
                )
                .await?;
                self.execute_in(conn, "UPDATE pbx_phone SET owner_username = NULL WHERE domain = $1 AND owner_username IN ($2)", &one)
                    .await?;
                self.execute_in(
                    conn,
                    "DELETE FROM subscriber WHERE domain = $1 AND username IN ($2)",
                    &one,
                )
                .await?;
            }
        }
        Ok(ActionOutcome::Done)
    }

    pub async fn read_phones(&self, selection: &UserSelection) -> Result<Vec<Phone>> {
        let mut conn = self.pool.acquire().await.map_err(|e| self.err(e))?;
        let users = self.read_users_on(&mut conn, selection).await?;
        let owners: Vec<String> = users.users.into_iter().map(|u| u.extension).collect();
        let mut phones = Vec::new();
        for chunk in owners.chunks(CHUNK) {
            let q = format!(
                "SELECT id, mac, vendor, model, owner_username, label FROM pbx_phone WHERE domain = $1 AND owner_username IN ({}) ORDER BY id",
                placeholders(2, chunk.len())
            );
            for row in self.fetch_in(&mut conn, &q, chunk).await? {
                phones.push(phone(&row).map_err(|e| self.err(e))?);
            }
        }
        Ok(phones)
    }

    /// The bindings of `extensions` in usrloc's `location` table, as ul.lookup shows them
    /// (usrloc `db_mode` 1 writes through, so the table is current). `last_modified` is in Unix
    /// seconds of the table's own clock (Kamailio writes its local time): compare it only with
    /// values read here.
    pub async fn registrations_of(&self, extensions: &[String]) -> Result<Vec<Registration>> {
        let modified = match self.dialect {
            Dialect::Postgres => "CAST(EXTRACT(EPOCH FROM last_modified) AS BIGINT)",
            Dialect::MySql => "CAST(UNIX_TIMESTAMP(last_modified) AS SIGNED)",
            // db_sqlite stores a Julian day number; strftime reads that and text dates alike.
            Dialect::Sqlite => "CAST(strftime('%s', last_modified) AS INTEGER)",
        };
        let mut conn = self.pool.acquire().await.map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(extensions.len());
        for chunk in extensions.chunks(CHUNK) {
            let q = format!(
                "SELECT username, contact, received, socket, callid, user_agent, {modified} FROM location WHERE domain = $1 AND username IN ({})",
                placeholders(2, chunk.len())
            );
            for row in self.fetch_in(&mut conn, &q, chunk).await? {
                let text = |i| text(&row, i).map_err(|e| self.err(e));
                let some = |s: String| (!s.is_empty() && s != "[not set]").then_some(s);
                out.push(Registration {
                    extension: text(0)?,
                    contact: text(1)?,
                    received: some(text(2)?),
                    socket: some(text(3)?),
                    call_id: text(4)?,
                    user_agent: text(5)?,
                    last_modified: int(&row, 6).unwrap_or(0),
                    expires: 0,
                });
            }
        }
        Ok(out)
    }

    pub async fn apply_phone_changes(
        &self,
        changes: &[(i64, PhoneField, String, String)],
    ) -> Result<Vec<WriteOutcome>> {
        let mut tx = self.begin().await.map_err(|e| self.err(e))?;
        let mut outcomes = Vec::with_capacity(changes.len());
        for (id, field, from, to) in changes {
            let column = match field {
                PhoneField::Model => "model",
                PhoneField::Label => "label",
            };
            // Compare-and-set in the statement itself.
            let q = format!(
                "UPDATE pbx_phone SET {column} = $1 WHERE id = $2 AND domain = $3 AND COALESCE({column}, '') = $4"
            );
            let n = sqlx::query(self.sql(&q))
                .bind(to)
                .bind(*id)
                .bind(&self.domain)
                .bind(from)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?
                .rows_affected();
            outcomes.push(if n == 1 {
                WriteOutcome::Applied
            } else {
                WriteOutcome::Conflict {
                    field: UserField::Status,
                    expected: Some(from.clone()),
                    found: None,
                }
            });
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(outcomes)
    }
}

/// The stored form of each secret a batch writes, by (extension, field).
type StoredSecrets = HashMap<(String, UserField), String>;

/// What a secret becomes once stored. A PIN: salted PBKDF2 ([`super::pin`]). The SIP password:
/// `ha1:` and its HA1 as Kamailio's digest auth needs it; that value only tells the writer which
/// users' `ha1`/`ha1b` to set (`set_password` writes them) and never leaves this module.
fn stored_secret(domain: &str, extension: &str, field: UserField, secret: &Secret) -> String {
    match field {
        UserField::Password => format!(
            "ha1:{}",
            md5_hex(&format!("{extension}:{domain}:{}", secret.expose()))
        ),
        _ => super::pin::hash(secret),
    }
}

/// An error's message for a target's result, without any stored secret the batch wrote (a
/// database may quote the refused value, e.g. MySQL's "Duplicate entry '...'").
fn redacted(e: &PbxError, secrets: &StoredSecrets) -> String {
    let mut message = e.to_string();
    for stored in secrets.values() {
        let value = stored.strip_prefix("ha1:").unwrap_or(stored);
        if !value.is_empty() {
            message = message.replace(value, "(secret)");
        }
    }
    message
}

/// An Atomic batch that did not commit: what had applied is rolled back.
fn roll_back(outcomes: &mut [WriteOutcome]) {
    for o in outcomes.iter_mut().filter(|o| **o == WriteOutcome::Applied) {
        *o = WriteOutcome::RolledBack;
    }
}

/// Whether two chunks may be written at once with the outcomes of writing them in order: no
/// user in both, and no number set in either (a number moves between users of any chunk, and
/// a change later in the run may expect the number an earlier one gave up).
fn independent(a: &[UserChange], b: &[UserChange]) -> bool {
    let moves_numbers = |chunk: &[UserChange]| {
        chunk
            .iter()
            .any(|c| !c.takes.is_empty() || c.writes.iter().any(|w| w.field.is_number()))
    };
    if moves_numbers(a) || moves_numbers(b) {
        return false;
    }
    let users: BTreeSet<&str> = a.iter().map(|c| c.extension.as_str()).collect();
    !b.iter().any(|c| users.contains(c.extension.as_str()))
}

/// The number a write gives its user, if it gives one.
fn given_number(w: &FieldWrite) -> Option<&str> {
    match (w.field, &w.to) {
        (f, NewValue::Set(n)) if f.is_number() => Some(n),
        _ => None,
    }
}

/// `rows` tuples of `width` placeholders numbered in the order they are written, so the values
/// bind in that order on every database (MySQL's `?` cannot refer back to an earlier one).
/// `shape` turns one row's placeholders (`$1, $2, ...`) into its tuple.
fn tuples(rows: usize, width: usize, shape: impl Fn(&str) -> String) -> String {
    (0..rows)
        .map(|r| shape(&placeholders(1 + r * width, width)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Preference rows read per (user, attribute): how many each user has.
type StoredRows = HashMap<(String, &'static str), u32>;

/// The (user, value) pairs of `rows` that set a value (not those that clear it).
fn values_set<'a>(rows: &'a [(&'a str, Option<String>)]) -> Vec<(&'a str, &'a str)> {
    rows.iter()
        .filter_map(|(e, v)| v.as_deref().map(|v| (*e, v)))
        .collect()
}

fn placeholders(start: usize, n: usize) -> String {
    (start..start + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn md5_hex(s: &str) -> String {
    hex::encode(Md5::digest(s.as_bytes()))
}

fn text(row: &AnyRow, i: usize) -> Result<String, sqlx::Error> {
    Ok(row.try_get::<Option<String>, _>(i)?.unwrap_or_default())
}

/// Integers come back as i32 or i64 depending on the driver and column type.
fn int(row: &AnyRow, i: usize) -> Result<i64, sqlx::Error> {
    row.try_get::<i64, _>(i)
        .or_else(|_| row.try_get::<i32, _>(i).map(i64::from))
}

fn phone(row: &AnyRow) -> Result<Phone, sqlx::Error> {
    let owner = text(row, 4)?;
    let label = text(row, 5)?;
    Ok(Phone {
        id: int(row, 0)?,
        mac: text(row, 1)?,
        vendor: text(row, 2)?,
        model: text(row, 3)?,
        owner: (!owner.is_empty()).then_some(owner),
        label: (!label.is_empty()).then_some(label),
    })
}

/// Turns a driver error into one that says what to fix, classed once here for every caller:
/// the database being unreachable or busy is transient (retried with backoff); data the database
/// refuses (constraints, bad values, exceptions raised by triggers) is permanent and fails the
/// targets it belongs to. Never includes the URL's credentials.
pub(crate) fn classify(target: &str, e: sqlx::Error) -> PbxError {
    let target = target.to_string();
    match &e {
        sqlx::Error::Database(db) => {
            let engine = if db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                Engine::Postgres
            } else if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                Engine::Sqlite
            } else if db
                .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .is_some()
            {
                Engine::MySql
            } else {
                Engine::Unknown
            };
            let number = db
                .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .map(|m| m.number())
                .unwrap_or(0);
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let detail = db.message().to_string();
            match class_of(engine, &code, number, db.kind(), &detail) {
                Class::Auth => PbxError::DatabaseAuth { target, detail },
                Class::MissingTables => PbxError::MissingTables {
                    target,
                    missing: detail,
                },
                Class::Unreachable => PbxError::DatabaseUnreachable { target, detail },
                Class::Busy => PbxError::DatabaseBusy { target, detail },
                Class::Refused => PbxError::Refused(detail),
                Class::Other => PbxError::Database(detail),
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => PbxError::DatabaseUnreachable {
            target,
            detail: e.to_string(),
        },
        sqlx::Error::Configuration(_) => {
            PbxError::InvalidUrl(format!("the database URL is not usable: {e}"))
        }
        _ => PbxError::Database(e.to_string()),
    }
}

/// Which database raised an error (its codes mean different things).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Postgres,
    MySql,
    Sqlite,
    Unknown,
}

/// What an error the database raised means for the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// Wrong user or password.
    Auth,
    /// Kamailio's schema is not loaded.
    MissingTables,
    /// The connection is gone, the server shuts down or the database does not exist.
    Unreachable,
    /// Deadlock, serialization failure, lock or statement timeout, resources: retry later.
    Busy,
    /// The data itself is refused: retrying fails the same way.
    Refused,
    Other,
}

/// Classes an error by the database's own code: PostgreSQL's SQLSTATE (class 08 connection,
/// 40 transaction rollback, 53 resources, 57 operator intervention, 55P03 lock not available are
/// transient; 22 data, 23 integrity, P0 raised by PL/pgSQL are refusals); MySQL/MariaDB's error
/// number with its SQLSTATE; SQLite's extended result code (primary code in the low byte).
fn class_of(
    engine: Engine,
    code: &str,
    mysql_number: u16,
    kind: ErrorKind,
    message: &str,
) -> Class {
    let lower = message.to_lowercase();
    let class = |prefixes: &[&str]| prefixes.iter().any(|p| code.starts_with(p));
    match engine {
        Engine::Postgres => match code {
            "28P01" | "28000" => Class::Auth,
            "42P01" => Class::MissingTables,
            "3D000" | "57P01" | "57P02" | "57P03" => Class::Unreachable,
            "55P03" | "57014" => Class::Busy,
            _ if class(&["08"]) => Class::Unreachable,
            _ if class(&["40", "53"]) => Class::Busy,
            _ if class(&["22", "23", "P0", "44"]) => Class::Refused,
            _ => Class::Other,
        },
        Engine::MySql => match mysql_number {
            1045 | 1698 => Class::Auth,
            1146 => Class::MissingTables,
            // Unknown database, too many connections, shutdown, lost or killed connections.
            1049
            | 1040
            | 1053
            | 1077
            | 1152
            | 1158..=1161
            | 1927
            | 2002
            | 2003
            | 2006
            | 2013
            | 4031 => Class::Unreachable,
            // Lock wait timeout, deadlock, interrupted, statement time limits (MySQL, MariaDB),
            // NOWAIT lock, XA deadlock.
            1205 | 1213 | 1317 | 3024 | 1969 | 3572 | 1614 => Class::Busy,
            // Duplicate key, NULL, foreign keys, data too long, out of range, bad value,
            // SIGNAL from a trigger, CHECK (MySQL 3819, MariaDB 4025).
            1022 | 1062 | 1169 | 1586 | 1048 | 1364 | 1216 | 1217 | 1451 | 1452 | 1406 | 1264
            | 1265 | 1292 | 1366 | 1644 | 3819 | 4025 => Class::Refused,
            _ => match code {
                "28000" => Class::Auth,
                "42S02" => Class::MissingTables,
                "45000" => Class::Refused,
                _ if class(&["08"]) => Class::Unreachable,
                _ if class(&["40"]) => Class::Busy,
                _ if class(&["22", "23"]) => Class::Refused,
                _ => Class::Other,
            },
        },
        Engine::Sqlite => {
            let extended: i64 = code.parse().unwrap_or(1);
            match extended & 0xff {
                // SQLITE_AUTH
                23 => Class::Auth,
                // SQLITE_BUSY, SQLITE_LOCKED, SQLITE_INTERRUPT, SQLITE_FULL, SQLITE_PROTOCOL
                5 | 6 | 9 | 13 | 15 => Class::Busy,
                // SQLITE_IOERR, SQLITE_CANTOPEN, SQLITE_NOTADB
                10 | 14 | 26 => Class::Unreachable,
                // SQLITE_CONSTRAINT (with RAISE() in triggers: SQLITE_CONSTRAINT_TRIGGER),
                // SQLITE_MISMATCH, SQLITE_TOOBIG
                18..=20 => Class::Refused,
                _ if lower.contains("no such table") => Class::MissingTables,
                _ => Class::Other,
            }
        }
        Engine::Unknown => {
            if kind != ErrorKind::Other {
                Class::Refused
            } else if lower.contains("password authentication failed") {
                Class::Auth
            } else if lower.contains("no such table") {
                Class::MissingTables
            } else if lower.contains("unable to open database") {
                Class::Unreachable
            } else if lower.contains("database is locked") || lower.contains("deadlock") {
                Class::Busy
            } else {
                Class::Other
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_never_show_credentials() {
        assert_eq!(
            redacted_target("postgres://kam:s3cret@db.example:5432/kamailio"),
            "postgres://db.example:5432/kamailio"
        );
        assert_eq!(
            redacted_target("sqlite:///var/lib/kamailio/k.db"),
            "sqlite:/var/lib/kamailio/k.db"
        );
        assert!(!redacted_target("mysql://root:pw@h/k").contains("pw"));
    }

    #[test]
    fn tuples_number_placeholders_in_writing_order() {
        assert_eq!(
            tuples(2, 3, |p| format!("({p}, CURRENT_TIMESTAMP)")),
            "($1, $2, $3, CURRENT_TIMESTAMP), ($4, $5, $6, CURRENT_TIMESTAMP)"
        );
    }

    #[test]
    fn postgres_errors_class_by_sqlstate() {
        let c = |code| class_of(Engine::Postgres, code, 0, ErrorKind::Other, "m");
        for transient in ["40001", "40P01", "55P03", "57014", "53300"] {
            assert_eq!(c(transient), Class::Busy, "{transient}");
        }
        for gone in ["08006", "08001", "57P01", "3D000"] {
            assert_eq!(c(gone), Class::Unreachable, "{gone}");
        }
        // Data (22), integrity (23), RAISE EXCEPTION in PL/pgSQL (P0001), ASSERT (P0004).
        for refused in [
            "22001", "22P02", "23505", "23503", "23502", "23514", "P0001", "P0004",
        ] {
            assert_eq!(c(refused), Class::Refused, "{refused}");
        }
        assert_eq!(c("28P01"), Class::Auth);
        assert_eq!(c("42P01"), Class::MissingTables);
        assert_eq!(
            c("42501"),
            Class::Other,
            "permission denied: a person must look"
        );
    }

    #[test]
    fn mysql_errors_class_by_number_then_sqlstate() {
        let c = |number, state| class_of(Engine::MySql, state, number, ErrorKind::Other, "m");
        assert_eq!(c(1213, "40001"), Class::Busy, "deadlock");
        assert_eq!(c(1205, "HY000"), Class::Busy, "lock wait timeout");
        assert_eq!(c(1969, "70100"), Class::Busy, "MariaDB max_statement_time");
        assert_eq!(c(2013, "HY000"), Class::Unreachable, "lost connection");
        for (number, state) in [
            (1062, "23000"), // duplicate entry
            (1048, "23000"), // column cannot be null
            (1452, "23000"), // foreign key
            (1406, "22001"), // data too long
            (1644, "45000"), // SIGNAL in a trigger
            (1644, "HY000"),
            (3819, "HY000"), // CHECK (MySQL)
            (4025, "23000"), // CHECK (MariaDB)
            (1366, "HY000"), // incorrect value
        ] {
            assert_eq!(c(number, state), Class::Refused, "{number} {state}");
        }
        assert_eq!(
            c(9999, "45000"),
            Class::Refused,
            "an unknown number's SQLSTATE decides"
        );
        assert_eq!(c(9999, "23000"), Class::Refused);
        assert_eq!(c(9999, "40001"), Class::Busy);
        assert_eq!(c(1045, "28000"), Class::Auth);
        assert_eq!(c(1146, "42S02"), Class::MissingTables);
        assert_eq!(c(1142, "42000"), Class::Other, "command denied");
    }

    #[test]
    fn sqlite_errors_class_by_extended_code() {
        let c = |code: &str| class_of(Engine::Sqlite, code, 0, ErrorKind::Other, "m");
        assert_eq!(c("5"), Class::Busy, "SQLITE_BUSY");
        assert_eq!(c("517"), Class::Busy, "SQLITE_BUSY_SNAPSHOT");
        assert_eq!(c("6"), Class::Busy, "SQLITE_LOCKED");
        assert_eq!(
            c("1811"),
            Class::Refused,
            "SQLITE_CONSTRAINT_TRIGGER (RAISE)"
        );
        assert_eq!(c("2067"), Class::Refused, "SQLITE_CONSTRAINT_UNIQUE");
        assert_eq!(c("1299"), Class::Refused, "SQLITE_CONSTRAINT_NOTNULL");
        assert_eq!(c("275"), Class::Refused, "SQLITE_CONSTRAINT_CHECK");
        assert_eq!(c("14"), Class::Unreachable, "SQLITE_CANTOPEN");
        assert_eq!(
            class_of(
                Engine::Sqlite,
                "1",
                0,
                ErrorKind::Other,
                "no such table: grp"
            ),
            Class::MissingTables
        );
        assert_eq!(c("1"), Class::Other);
    }

    #[test]
    fn unknown_engines_class_by_kind() {
        let c = |kind, message| class_of(Engine::Unknown, "", 0, kind, message);
        assert_eq!(c(ErrorKind::UniqueViolation, "dup"), Class::Refused);
        assert_eq!(c(ErrorKind::Other, "database is locked"), Class::Busy);
        assert_eq!(c(ErrorKind::Other, "something"), Class::Other);
    }

    /// The classifier on errors a real database raised (SQLite in memory, through the Any
    /// driver the backend uses): a trigger's RAISE and a constraint are refusals, permanent.
    #[tokio::test]
    async fn real_sqlite_refusals_are_permanent() {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        for q in [
            "CREATE TABLE usr_preferences (username TEXT NOT NULL, value TEXT, UNIQUE (username))",
            "CREATE TRIGGER frozen BEFORE INSERT ON usr_preferences WHEN NEW.username = '205' BEGIN SELECT RAISE(ABORT, 'extension 205 is frozen by policy'); END",
        ] {
            sqlx::query(q).execute(&pool).await.unwrap();
        }
        let insert = |u: &'static str| {
            let pool = pool.clone();
            async move {
                sqlx::query("INSERT INTO usr_preferences (username, value) VALUES ($1, 'x')")
                    .bind(u)
                    .execute(&pool)
                    .await
            }
        };
        let e = classify("sqlite:/x", insert("205").await.unwrap_err());
        assert!(
            matches!(&e, PbxError::Refused(m) if m.contains("extension 205 is frozen by policy")),
            "{e:?}"
        );
        assert!(!e.is_transient());
        assert!(e.to_string().contains("correct the value"), "{e}");
        insert("201").await.unwrap();
        let e = classify("sqlite:/x", insert("201").await.unwrap_err());
        assert!(matches!(e, PbxError::Refused(_)), "{e:?}");
        let e = classify(
            "sqlite:/x",
            sqlx::query("INSERT INTO usr_preferences (username) VALUES (NULL)")
                .execute(&pool)
                .await
                .unwrap_err(),
        );
        assert!(matches!(e, PbxError::Refused(_)), "{e:?}");
        assert!(classify("sqlite:/x", sqlx::Error::PoolTimedOut).is_transient());
    }

    #[test]
    fn result_messages_never_quote_a_stored_secret() {
        let pin = stored_secret(
            "pbx.test",
            "205",
            UserField::VoicemailPin,
            &Secret::new("1234"),
        );
        let ha1 = stored_secret("pbx.test", "205", UserField::Password, &Secret::new("pw"));
        let secrets: StoredSecrets = [
            (("205".to_string(), UserField::VoicemailPin), pin.clone()),
            (("205".to_string(), UserField::Password), ha1.clone()),
        ]
        .into();
        let e = PbxError::Refused(format!(
            "Duplicate entry '{pin}' for key 'x'; Duplicate entry '{}'",
            ha1.trim_start_matches("ha1:")
        ));
        let m = redacted(&e, &secrets);
        assert!(
            !m.contains(&pin) && !m.contains(ha1.trim_start_matches("ha1:")),
            "{m}"
        );
        assert!(m.contains("Duplicate entry '(secret)'"), "{m}");
    }

    #[test]
    fn chunks_go_side_by_side_only_when_no_number_moves_and_no_user_repeats() {
        let change = |ext: &str, field: UserField| UserChange {
            extension: ext.into(),
            writes: vec![FieldWrite {
                field,
                from: None,
                to: NewValue::Set("1".into()),
            }],
            takes: vec![],
        };
        let a = [
            change("200", UserField::CallGroup),
            change("201", UserField::CallGroup),
        ];
        let b = [
            change("202", UserField::CallGroup),
            change("203", UserField::PickupGroup),
        ];
        assert!(independent(&a, &b));
        let repeated = [change("201", UserField::PickupGroup)];
        assert!(!independent(&a, &repeated));
        assert!(!independent(&repeated, &a));
        let numbered = [change("204", UserField::PrivateNumber)];
        assert!(!independent(&a, &numbered));
        assert!(!independent(&numbered, &b));
        let mut taking = change("205", UserField::CallGroup);
        taking.takes.push(crate::pbx::directory::Move {
            number: "5000".into(),
            holder: "299".into(),
            held_as: UserField::PrivateNumber,
        });
        assert!(!independent(&a, &[taking]));
    }

    #[test]
    fn placeholders_count_from_start() {
        assert_eq!(placeholders(2, 3), "$2, $3, $4");
    }
}
