//! An Atomic change's one transaction, held open across the run's batches: each batch's writes
//! go in behind a savepoint, compare-and-set against what the transaction holds (the batches
//! before it included), and nothing is visible to anyone until the commit.

use async_trait::async_trait;

use super::{Db, StoredSecrets, redacted, roll_back};
use crate::pbx::{AtomicWrites, PbxError, Result, UserChange, WriteOutcome};

pub struct AtomicTx<'a> {
    db: &'a Db,
    /// None once a refusal ended the transaction (SQLite's RAISE(ROLLBACK)): nothing stands.
    tx: Option<sqlx::Transaction<'static, sqlx::Any>>,
}

impl Db {
    pub async fn begin_atomic(&self) -> Result<AtomicTx<'_>> {
        let tx = self.begin().await.map_err(|e| self.err(e))?;
        Ok(AtomicTx {
            db: self,
            tx: Some(tx),
        })
    }
}

#[async_trait]
impl AtomicWrites for AtomicTx<'_> {
    async fn apply(&mut self, changes: &[UserChange]) -> Result<Vec<WriteOutcome>> {
        let db = self.db;
        let Some(tx) = self.tx.as_mut() else {
            return Ok(vec![WriteOutcome::RolledBack; changes.len()]);
        };
        let secrets: StoredSecrets = db.stored_secrets(changes).await?;
        let mut savepoint = sqlx::Connection::begin(&mut **tx)
            .await
            .map_err(|e| db.err(e))?;
        match db
            .compare_and_write(&mut savepoint, changes, &secrets)
            .await
        {
            Ok(outcomes) => {
                savepoint.commit().await.map_err(|e| db.err(e))?;
                Ok(outcomes)
            }
            // Somebody's data was refused in a bulk statement: find out whose, user by user.
            Err(PbxError::Refused(_)) => {
                if savepoint.rollback().await.is_err() {
                    // The refusal ended the whole transaction (SQLite's RAISE(ROLLBACK)):
                    // nothing stands. Whose data it was is found in a transaction of its own,
                    // rolled back.
                    self.tx = None;
                    let mut fresh = db.begin().await.map_err(|e| db.err(e))?;
                    let (mut outcomes, _) =
                        db.replay_one_by_one(&mut fresh, changes, &secrets).await?;
                    drop(fresh);
                    roll_back(&mut outcomes);
                    return Ok(outcomes);
                }
                let (mut outcomes, alive) = db.replay_one_by_one(tx, changes, &secrets).await?;
                if !alive {
                    self.tx = None;
                    roll_back(&mut outcomes);
                }
                Ok(outcomes)
            }
            Err(e) => Err(e),
        }
    }

    async fn commit(self: Box<Self>) -> Result<Option<String>> {
        let db = self.db;
        let Some(tx) = self.tx else {
            return Ok(Some("the database ended the transaction".into()));
        };
        match tx.commit().await.map_err(|e| db.err(e)) {
            Ok(()) => Ok(None),
            Err(e) if e.is_transient() => Err(e),
            // Refused at commit (a deferred constraint): it names no one target.
            Err(e) => Ok(Some(redacted(&e, &StoredSecrets::new()))),
        }
    }

    async fn rollback(self: Box<Self>) -> Result<()> {
        match self.tx {
            Some(tx) => tx.rollback().await.map_err(|e| self.db.err(e)),
            None => Ok(()),
        }
    }
}
