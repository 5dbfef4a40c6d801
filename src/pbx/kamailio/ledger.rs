//! The run ledger in the Kamailio database: `pbx_ledger` (one row per executed run) and
//! `pbx_ledger_batch` (the run's journal, one row per batch, as JSON lines), created by the
//! operator's own migrations. Times are Unix milliseconds, so every database stores them alike.

use sqlx::Row;

use super::{Db, int, text};
use crate::pbx::{LedgerCounts, LedgerEntry, LedgerFilter, LedgerKey, Result};

const COLUMNS: &str = "id, kind, namespace, name, uid, spec_hash, plan_hash, requested_by, started, finished, phase, targets, changed, failed, uncertain, summary, batches, plan";

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

fn entry(row: &sqlx::any::AnyRow) -> Result<LedgerEntry, sqlx::Error> {
    let opt_int = |i: usize| -> Result<Option<i64>, sqlx::Error> {
        match row.try_get::<Option<i64>, _>(i) {
            Ok(v) => Ok(v),
            Err(_) => row.try_get::<Option<i32>, _>(i).map(|v| v.map(i64::from)),
        }
    };
    let requested_by = text(row, 7)?;
    let phase = text(row, 10)?;
    Ok(LedgerEntry {
        id: text(row, 0)?,
        kind: text(row, 1)?,
        namespace: text(row, 2)?,
        name: text(row, 3)?,
        uid: text(row, 4)?,
        spec_hash: text(row, 5)?,
        plan_hash: text(row, 6)?,
        requested_by: (!requested_by.is_empty()).then_some(requested_by),
        started: int(row, 8)?,
        finished: opt_int(9)?,
        phase: (!phase.is_empty()).then_some(phase),
        counts: LedgerCounts {
            targets: int(row, 11)? as u32,
            changed: int(row, 12)? as u32,
            failed: int(row, 13)? as u32,
            uncertain: int(row, 14)? as u32,
            summary: text(row, 15)?,
        },
        batches: int(row, 16)? as u32,
        plan: text(row, 17)?,
    })
}

impl Db {
    pub async fn ledger_find(&self, key: &LedgerKey) -> Result<Option<LedgerEntry>> {
        let q = format!(
            "SELECT {COLUMNS} FROM pbx_ledger WHERE domain = $1 AND namespace = $2 AND name = $3 AND kind = $4 AND spec_hash = $5 ORDER BY started DESC, id DESC LIMIT 1"
        );
        let row = sqlx::query(self.sql(&q))
            .bind(&self.domain)
            .bind(&key.namespace)
            .bind(&key.name)
            .bind(&key.kind)
            .bind(&key.spec_hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        row.map(|r| entry(&r)).transpose().map_err(|e| self.err(e))
    }

    pub async fn ledger_begin(&self, e: &LedgerEntry, batches: &[String]) -> Result<()> {
        let mut tx = self.begin().await.map_err(|e| self.err(e))?;
        let q = "INSERT INTO pbx_ledger (id, domain, kind, namespace, name, uid, spec_hash, plan_hash, requested_by, started, batches, plan) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";
        sqlx::query(self.sql(q))
            .bind(&e.id)
            .bind(&self.domain)
            .bind(&e.kind)
            .bind(&e.namespace)
            .bind(&e.name)
            .bind(&e.uid)
            .bind(&e.spec_hash)
            .bind(&e.plan_hash)
            .bind(e.requested_by.clone())
            .bind(e.started)
            .bind(i64::from(e.batches))
            .bind(&e.plan)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        for (index, rows) in batches.iter().enumerate() {
            sqlx::query(
                self.sql(
                    "INSERT INTO pbx_ledger_batch (ledger_id, idx, journal) VALUES ($1, $2, $3)",
                ),
            )
            .bind(&e.id)
            .bind(index as i64)
            .bind(rows)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    pub async fn ledger_record(&self, id: &str, index: usize, rows: &str) -> Result<()> {
        let mut tx = self.begin().await.map_err(|e| self.err(e))?;
        sqlx::query(self.sql("DELETE FROM pbx_ledger_batch WHERE ledger_id = $1 AND idx = $2"))
            .bind(id)
            .bind(index as i64)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        sqlx::query(
            self.sql("INSERT INTO pbx_ledger_batch (ledger_id, idx, journal) VALUES ($1, $2, $3)"),
        )
        .bind(id)
        .bind(index as i64)
        .bind(rows)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))
    }

    pub async fn ledger_batches(&self, id: &str) -> Result<Vec<String>> {
        let rows = sqlx::query(
            self.sql("SELECT journal FROM pbx_ledger_batch WHERE ledger_id = $1 ORDER BY idx"),
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        rows.iter()
            .map(|r| text(r, 0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))
    }

    pub async fn ledger_batch(&self, id: &str, index: usize) -> Result<Option<String>> {
        let row = sqlx::query(
            self.sql("SELECT journal FROM pbx_ledger_batch WHERE ledger_id = $1 AND idx = $2"),
        )
        .bind(id)
        .bind(index as i64)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        row.map(|r| text(&r, 0))
            .transpose()
            .map_err(|e| self.err(e))
    }

    pub async fn ledger_adopt(&self, id: &str, uid: &str) -> Result<()> {
        sqlx::query(self.sql("UPDATE pbx_ledger SET uid = $1 WHERE id = $2"))
            .bind(uid)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub async fn ledger_finish(&self, id: &str, phase: &str, c: &LedgerCounts) -> Result<()> {
        let q = "UPDATE pbx_ledger SET finished = $1, phase = $2, targets = $3, changed = $4, failed = $5, uncertain = $6, summary = $7 WHERE id = $8";
        sqlx::query(self.sql(q))
            .bind(now_ms())
            .bind(phase)
            .bind(i64::from(c.targets))
            .bind(i64::from(c.changed))
            .bind(i64::from(c.failed))
            .bind(i64::from(c.uncertain))
            .bind(&c.summary)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub async fn ledger_list(&self, f: &LedgerFilter) -> Result<Vec<LedgerEntry>> {
        // Every filter is a bound value; an absent one matches everything.
        let q = format!(
            "SELECT {COLUMNS} FROM pbx_ledger WHERE domain = $1 \
             AND ($2 = '' OR namespace = $3) AND ($4 = '' OR name = $5) \
             AND ($6 = '' OR requested_by = $7) AND started >= $8 AND started < $9 \
             ORDER BY started, id"
        );
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        let rows = sqlx::query(self.sql(&q))
            .bind(&self.domain)
            .bind(opt(&f.namespace))
            .bind(opt(&f.namespace))
            .bind(opt(&f.name))
            .bind(opt(&f.name))
            .bind(opt(&f.requested_by))
            .bind(opt(&f.requested_by))
            .bind(f.since.unwrap_or(i64::MIN))
            .bind(f.until.unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        rows.iter()
            .map(entry)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))
    }
}
