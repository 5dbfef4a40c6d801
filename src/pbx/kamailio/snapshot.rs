//! Snapshots of users in the Kamailio database (`pbx_snapshot`, created by the operator's own
//! migrations), and restores from them. What a snapshot copies, and what it leaves out:
//!
//! | kept | left out |
//! |---|---|
//! | the subscriber (username, domain) | `password`, `ha1`, `ha1b` |
//! | every `usr_preferences` row (attribute, type, value) | `pbx.voicemail_pin` (a PIN hash), `pbx.totp_secret` (the second factor) |
//! | every `grp` row, every `dbaliases` row in order | |
//! | the ids of the `pbx_phone` rows the user owns | |
//!
//! A restore creates the subscriber again with a secret nobody knows (or, for a recycled user,
//! keeps the one the recycle rotated to) and sets `pbx.status` to PasswordRequired.

use std::collections::BTreeSet;

use sqlx::AnyConnection;

use super::{Db, int, placeholders, text};
use crate::pbx::kamailio::recycle::PASSWORD_REQUIRED;
use crate::pbx::kamailio::schema::{self, Storage, TWO_FACTOR_ATTRIBUTE};
use crate::pbx::{
    Expect, KeptSnapshot, Preference, RestoreOutcome, Result, Secret, User, UserField, UserRestore,
    UserSelection, UserSnapshot,
};

/// Preferences a snapshot never holds: secrets.
fn secret_attribute(attribute: &str) -> bool {
    attribute == TWO_FACTOR_ATTRIBUTE
        || UserField::ALL.into_iter().any(|f| {
            f.is_secret() && matches!(schema::storage(f), Storage::Attribute(a) if a == attribute)
        })
}

fn attribute_of(field: UserField) -> &'static str {
    match schema::storage(field) {
        Storage::Attribute(a) => a,
        _ => "",
    }
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

impl Db {
    pub async fn keep_snapshots(&self, run: &str, extensions: &[String]) -> Result<()> {
        for chunk in extensions.chunks(super::CHUNK) {
            let mut tx = self.begin().await.map_err(|e| self.err(e))?;
            let list = placeholders(3, chunk.len());
            let q = format!(
                "SELECT username FROM pbx_snapshot WHERE domain = $1 AND run = $2 AND username IN ({list})"
            );
            let mut query = sqlx::query(self.sql(&q)).bind(self.domain()).bind(run);
            for e in chunk {
                query = query.bind(e);
            }
            let rows = query.fetch_all(&mut *tx).await.map_err(|e| self.err(e))?;
            let kept: BTreeSet<String> = rows.iter().filter_map(|r| text(r, 0).ok()).collect();
            let missing: Vec<String> = chunk
                .iter()
                .filter(|e| !kept.contains(*e))
                .cloned()
                .collect();
            if missing.is_empty() {
                continue;
            }
            let taken = now_ms();
            for snapshot in self.take(&mut tx, &missing).await? {
                let data = serde_json::to_string(&snapshot).expect("snapshots serialize");
                sqlx::query(self.sql(
                    "INSERT INTO pbx_snapshot (run, domain, username, taken, data) VALUES ($1, $2, $3, $4, $5)",
                ))
                .bind(run)
                .bind(self.domain())
                .bind(&snapshot.extension)
                .bind(taken)
                .bind(data)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
            }
            tx.commit().await.map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Reads the snapshots of the `extensions` that exist (others have none).
    async fn take(
        &self,
        conn: &mut AnyConnection,
        extensions: &[String],
    ) -> Result<Vec<UserSnapshot>> {
        let list = placeholders(2, extensions.len());
        let mut out: std::collections::BTreeMap<String, UserSnapshot> = Default::default();
        let q =
            format!("SELECT username FROM subscriber WHERE domain = $1 AND username IN ({list})");
        for row in self.fetch_in(conn, &q, extensions).await? {
            let extension = text(&row, 0).map_err(|e| self.err(e))?;
            out.insert(
                extension.clone(),
                UserSnapshot {
                    extension,
                    ..Default::default()
                },
            );
        }
        let q = format!(
            "SELECT username, attribute, type, value FROM usr_preferences WHERE domain = $1 AND username IN ({list}) ORDER BY username, attribute, value"
        );
        for row in self.fetch_in(conn, &q, extensions).await? {
            let attribute = text(&row, 1).map_err(|e| self.err(e))?;
            if secret_attribute(&attribute) {
                continue;
            }
            let ext = text(&row, 0).map_err(|e| self.err(e))?;
            if let Some(s) = out.get_mut(&ext) {
                s.preferences.push(Preference {
                    attribute,
                    kind: int(&row, 2).map_err(|e| self.err(e))?,
                    value: text(&row, 3).map_err(|e| self.err(e))?,
                });
            }
        }
        for (q, what) in [
            (
                format!(
                    "SELECT username, grp FROM grp WHERE domain = $1 AND username IN ({list}) ORDER BY grp"
                ),
                0,
            ),
            (
                format!(
                    "SELECT username, alias_username FROM dbaliases WHERE domain = $1 AND username IN ({list}) ORDER BY id"
                ),
                1,
            ),
        ] {
            for row in self.fetch_in(conn, &q, extensions).await? {
                let ext = text(&row, 0).map_err(|e| self.err(e))?;
                let value = text(&row, 1).map_err(|e| self.err(e))?;
                if let Some(s) = out.get_mut(&ext) {
                    if what == 0 {
                        s.groups.push(value);
                    } else {
                        s.numbers.push(value);
                    }
                }
            }
        }
        for s in out.values_mut() {
            s.private_number = s
                .preference(attribute_of(UserField::PrivateNumber))
                .map(str::to_string);
        }
        let q = format!(
            "SELECT owner_username, id FROM pbx_phone WHERE domain = $1 AND owner_username IN ({list}) ORDER BY id"
        );
        for row in self.fetch_in(conn, &q, extensions).await? {
            let ext = text(&row, 0).map_err(|e| self.err(e))?;
            if let Some(s) = out.get_mut(&ext) {
                s.phones.push(int(&row, 1).map_err(|e| self.err(e))?);
            }
        }
        Ok(out.into_values().collect())
    }

    pub async fn snapshots(&self, run: &str, extensions: &[String]) -> Result<Vec<KeptSnapshot>> {
        let mut out = Vec::new();
        let mut conn = self.pool.acquire().await.map_err(|e| self.err(e))?;
        for chunk in extensions.chunks(super::CHUNK) {
            let q = format!(
                "SELECT username, taken, data, expired, restored_by FROM pbx_snapshot WHERE domain = $1 AND run = $2 AND username IN ({})",
                placeholders(3, chunk.len())
            );
            let mut query = sqlx::query(self.sql(&q)).bind(self.domain()).bind(run);
            for e in chunk {
                query = query.bind(e);
            }
            for row in query.fetch_all(&mut *conn).await.map_err(|e| self.err(e))? {
                let data = text(&row, 2).map_err(|e| self.err(e))?;
                let snapshot = if data.is_empty() {
                    None
                } else {
                    // A row this operator did not write is not restored from.
                    Some(serde_json::from_str(&data).map_err(|e| {
                        crate::pbx::PbxError::Database(format!(
                            "pbx_snapshot of run {run} holds data that is not a snapshot ({e}); delete that row or restore it from a backup"
                        ))
                    })?)
                };
                let expired = sqlx::Row::try_get::<Option<i64>, _>(&row, 3).unwrap_or(None);
                let restored_by = text(&row, 4).map_err(|e| self.err(e))?;
                let user = snapshot.as_ref().map(user_of);
                out.push(KeptSnapshot {
                    user,
                    run: run.to_string(),
                    extension: text(&row, 0).map_err(|e| self.err(e))?,
                    taken: int(&row, 1).map_err(|e| self.err(e))?,
                    snapshot,
                    expired,
                    restored_by: (!restored_by.is_empty()).then_some(restored_by),
                });
            }
        }
        Ok(out)
    }

    pub async fn expire_snapshots(&self, taken_before: i64) -> Result<u64> {
        let q = "UPDATE pbx_snapshot SET data = NULL, expired = $1 WHERE domain = $2 AND taken < $3 AND data IS NOT NULL";
        Ok(sqlx::query(self.sql(q))
            .bind(now_ms())
            .bind(self.domain())
            .bind(taken_before)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?
            .rows_affected())
    }

    /// Each restore in its own transaction: one conflict or failure stays one target's.
    pub async fn restore_users(&self, restores: &[UserRestore]) -> Result<Vec<RestoreOutcome>> {
        let mut outcomes = Vec::with_capacity(restores.len());
        for restore in restores {
            let mut tx = self.begin().await.map_err(|e| self.err(e))?;
            let outcome = match self.restore_on(&mut tx, restore).await {
                Ok(outcome) => outcome,
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => RestoreOutcome::Failed(e.to_string()),
            };
            if matches!(outcome, RestoreOutcome::Restored { .. }) {
                tx.commit().await.map_err(|e| self.err(e))?;
            }
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    async fn restore_on(
        &self,
        conn: &mut AnyConnection,
        restore: &UserRestore,
    ) -> Result<RestoreOutcome> {
        let s = &restore.snapshot;
        let ext = s.extension.as_str();
        let selection = UserSelection {
            groups: vec![],
            extensions: vec![ext.to_string()],
        };
        let q =
            "SELECT restored_by FROM pbx_snapshot WHERE domain = $1 AND run = $2 AND username = $3";
        let restored_by = sqlx::query(self.sql(q))
            .bind(self.domain())
            .bind(&restore.run)
            .bind(ext)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| self.err(e))?
            .map(|r| text(&r, 0))
            .transpose()
            .map_err(|e| self.err(e))?;
        match restored_by {
            None => {
                return Ok(RestoreOutcome::Failed(format!(
                    "no snapshot of {ext} kept by run {}: nothing restored",
                    restore.run
                )));
            }
            Some(by) if by == restore.by => return Ok(RestoreOutcome::AlreadyRestored),
            Some(_) => {}
        }
        let now = self.read_users_on(conn, &selection).await?.users.pop();
        match (&restore.expect, &now) {
            (Expect::Absent, Some(_)) => {
                return Ok(RestoreOutcome::Conflict(format!(
                    "extension {ext} exists again on the PBX (created since it was removed): nothing restored, it is left as it is"
                )));
            }
            (Expect::Present(_), None) => {
                return Ok(RestoreOutcome::Conflict(format!(
                    "extension {ext} no longer exists on the PBX: nothing to restore it on"
                )));
            }
            (Expect::Present(expected), Some(user)) => {
                let moved: Vec<String> = expected
                    .iter()
                    .filter(|(f, v)| user.get(*f) != v.as_deref())
                    .map(|(f, v)| {
                        format!(
                            "{f} is {} now, not {} as the change left it",
                            shown(user.get(*f)),
                            shown(v.as_deref())
                        )
                    })
                    .collect();
                if !moved.is_empty() {
                    return Ok(RestoreOutcome::Conflict(format!(
                        "{}: changed since, nothing restored",
                        moved.join("; ")
                    )));
                }
            }
            (Expect::Absent, None) => {}
        }
        if now.is_none() {
            sqlx::query(self.sql(
                "INSERT INTO subscriber (username, domain, password, ha1, ha1b) VALUES ($1, $2, '', '', '')",
            ))
            .bind(ext)
            .bind(self.domain())
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
            // A secret nobody knows: the person sets their own through the self-care portal.
            self.set_password(conn, ext, &Secret::generate()).await?;
        }
        let one = vec![ext.to_string()];
        // What the user has now gives way to the snapshot; its secrets stay as they are.
        for q in [
            "DELETE FROM grp WHERE domain = $1 AND username IN ($2)",
            "DELETE FROM dbaliases WHERE domain = $1 AND username IN ($2)",
        ] {
            self.execute_in(conn, q, &one).await?;
        }
        let keep_secret = [TWO_FACTOR_ATTRIBUTE, attribute_of(UserField::VoicemailPin)];
        sqlx::query(self.sql(
            "DELETE FROM usr_preferences WHERE domain = $1 AND username = $2 AND attribute <> $3 AND attribute <> $4",
        ))
        .bind(self.domain())
        .bind(ext)
        .bind(keep_secret[0])
        .bind(keep_secret[1])
        .execute(&mut *conn)
        .await
        .map_err(|e| self.err(e))?;

        let mut conflicts = Vec::new();
        let private = attribute_of(UserField::PrivateNumber);
        let numbers: Vec<String> = s.all_numbers().cloned().collect();
        let taken: std::collections::HashMap<String, String> = self
            .number_holders_on(conn, &numbers)
            .await?
            .into_iter()
            .filter(|(_, holder)| holder != ext)
            .collect();
        let status = attribute_of(UserField::Status);
        let private_location = attribute_of(UserField::PrivateNumberLocation);
        let private_taken = s.preference(private).and_then(|n| taken.get(n));
        for p in &s.preferences {
            if p.attribute == status
                || (private_taken.is_some()
                    && [private, private_location].contains(&p.attribute.as_str()))
            {
                continue;
            }
            sqlx::query(self.sql(
                "INSERT INTO usr_preferences (username, domain, attribute, type, value, last_modified) VALUES ($1, $2, $3, $4, $5, CURRENT_TIMESTAMP)",
            ))
            .bind(ext)
            .bind(self.domain())
            .bind(&p.attribute)
            .bind(p.kind)
            .bind(&p.value)
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        }
        if let (Some(n), Some(holder)) = (s.preference(private), private_taken) {
            conflicts.push(format!(
                "private number {n} is {holder}'s now: left to {holder}, not restored"
            ));
        }
        self.replace_attribute(conn, status, &[(ext, Some(PASSWORD_REQUIRED.to_string()))])
            .await?;
        for g in &s.groups {
            sqlx::query(self.sql(
                "INSERT INTO grp (username, domain, grp, last_modified) VALUES ($1, $2, $3, CURRENT_TIMESTAMP)",
            ))
            .bind(ext)
            .bind(self.domain())
            .bind(g)
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        }
        for n in &s.numbers {
            if let Some(holder) = taken.get(n) {
                conflicts.push(format!(
                    "number {n} is {holder}'s now: left to {holder}, not restored"
                ));
                continue;
            }
            sqlx::query(self.sql(
                "INSERT INTO dbaliases (alias_username, alias_domain, username, domain) VALUES ($1, $2, $3, $4)",
            ))
            .bind(n)
            .bind(self.domain())
            .bind(ext)
            .bind(self.domain())
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        }
        for id in &s.phones {
            let given = sqlx::query(self.sql(
                // Each placeholder once: MySQL's are positional.
                "UPDATE pbx_phone SET owner_username = $1 WHERE domain = $2 AND id = $3 AND (owner_username IS NULL OR owner_username = '' OR owner_username = $4)",
            ))
            .bind(ext)
            .bind(self.domain())
            .bind(*id)
            .bind(ext)
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?
            .rows_affected();
            if given == 0 {
                let owner = sqlx::query(self.sql(
                    "SELECT mac, owner_username FROM pbx_phone WHERE domain = $1 AND id = $2",
                ))
                .bind(self.domain())
                .bind(*id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| self.err(e))?;
                conflicts.push(match owner {
                    Some(row) => format!(
                        "phone {} is {}'s now: left to them, not given back",
                        text(&row, 0).map_err(|e| self.err(e))?,
                        text(&row, 1).map_err(|e| self.err(e))?
                    ),
                    None => format!("phone {id} is no longer provisioned: not given back"),
                });
            }
        }
        // Recorded with the restore itself: a run resumed after a crash finds it done.
        sqlx::query(self.sql(
            "UPDATE pbx_snapshot SET restored_by = $1 WHERE domain = $2 AND run = $3 AND username = $4",
        ))
        .bind(&restore.by)
        .bind(self.domain())
        .bind(&restore.run)
        .bind(ext)
        .execute(&mut *conn)
        .await
        .map_err(|e| self.err(e))?;
        Ok(RestoreOutcome::Restored { conflicts })
    }
}

/// The user a snapshot holds, field by field, as reading it from the tables would give it.
fn user_of(s: &UserSnapshot) -> User {
    let mut user = User {
        extension: s.extension.clone(),
        numbers: s.numbers.clone(),
        ..Default::default()
    };
    for field in UserField::ALL {
        if let Some(d) = schema::default_value(field) {
            user.values.insert(field, d.to_string());
        }
        if let Storage::Attribute(a) = schema::storage(field) {
            if let Some(v) = s.preference(a) {
                user.values.insert(field, schema::canonical(field, v));
            }
        }
    }
    if !s.groups.is_empty() {
        let mut groups = s.groups.clone();
        groups.sort();
        user.values.insert(UserField::Groups, groups.join(","));
    }
    if let Some(primary) = s.numbers.first() {
        user.values
            .insert(UserField::PrimaryNumber, primary.clone());
    }
    user
}

fn shown(v: Option<&str>) -> String {
    v.map(|v| format!("{v:?}"))
        .unwrap_or_else(|| "(unset)".into())
}
