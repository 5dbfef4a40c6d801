//! Test doubles for the engine's own unit tests, which run without servers: an in-memory PBX,
//! an outbox that records what it sends, and a journal that "crashes" at a chosen record (the
//! side effects before it happened, its record did not). Integration tests use the real servers.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;

use super::Error;
use crate::pbx::{
    ActionOutcome, Capabilities, NewIdentity, NewValue, PbxBackend, Phone, PhoneField, Policies,
    Probe, Registration, ResetOutcome, SipAnswer, User, UserAction, UserChange, UserField,
    UserRead, UserReset, UserSelection, WriteOutcome,
};
use crate::plan::stored::Row;

#[derive(Default)]
pub struct Pbx {
    pub users: Mutex<BTreeMap<String, User>>,
    pub resets: Mutex<BTreeMap<String, u32>>,
}

pub fn user(ext: &str) -> User {
    User {
        extension: ext.into(),
        values: [
            (UserField::Email, format!("u{ext}@acme.test")),
            (UserField::CallGroup, "1".into()),
        ]
        .into_iter()
        .collect(),
        numbers: vec![],
    }
}

#[async_trait]
impl PbxBackend for Pbx {
    fn capabilities(&self) -> Capabilities {
        unimplemented!("not used by the engine")
    }
    async fn probe(&self) -> crate::pbx::Result<Probe> {
        unimplemented!("not used by the engine")
    }
    async fn read_users(&self, s: &UserSelection) -> crate::pbx::Result<UserRead> {
        let users = self.users.lock().unwrap();
        Ok(UserRead {
            users: s
                .extensions
                .iter()
                .filter_map(|e| users.get(e).cloned())
                .collect(),
            ..Default::default()
        })
    }
    async fn extensions(&self) -> crate::pbx::Result<Vec<String>> {
        unimplemented!("not used by the engine")
    }
    async fn number_holders(&self, _: &[String]) -> crate::pbx::Result<Vec<(String, String)>> {
        unimplemented!("not used by the engine")
    }
    async fn policies(&self) -> crate::pbx::Result<Policies> {
        unimplemented!("not used by the engine")
    }
    async fn apply_user_changes(
        &self,
        changes: &[UserChange],
        _atomic: bool,
    ) -> crate::pbx::Result<Vec<WriteOutcome>> {
        let mut users = self.users.lock().unwrap();
        Ok(changes
            .iter()
            .map(|c| {
                let Some(u) = users.get_mut(&c.extension) else {
                    return WriteOutcome::NotFound;
                };
                for w in &c.writes {
                    if u.get(w.field).map(str::to_string) != w.from {
                        return WriteOutcome::Conflict {
                            field: w.field,
                            expected: w.from.clone(),
                            found: u.get(w.field).map(str::to_string),
                        };
                    }
                }
                for w in &c.writes {
                    if let NewValue::Set(v) = &w.to {
                        u.values.insert(w.field, v.clone());
                    }
                }
                WriteOutcome::Applied
            })
            .collect())
    }
    async fn apply_actions(
        &self,
        actions: &[(String, UserAction)],
    ) -> crate::pbx::Result<Vec<ActionOutcome>> {
        let mut users = self.users.lock().unwrap();
        Ok(actions
            .iter()
            .map(|(ext, a)| {
                if !users.contains_key(ext) {
                    return ActionOutcome::NotFound;
                }
                match a {
                    UserAction::Remove => {
                        users.remove(ext);
                    }
                    UserAction::ResetPassword(_) => {
                        *self.resets.lock().unwrap().entry(ext.clone()).or_default() += 1;
                    }
                    _ => {}
                }
                ActionOutcome::Done
            })
            .collect())
    }
    async fn read_phones(&self, _: &UserSelection) -> crate::pbx::Result<Vec<Phone>> {
        unimplemented!("not used by the engine")
    }
    async fn apply_phone_changes(
        &self,
        _: &[(i64, PhoneField, String, String)],
    ) -> crate::pbx::Result<Vec<WriteOutcome>> {
        unimplemented!("not used by the engine")
    }
    async fn registrations(&self) -> crate::pbx::Result<Vec<Registration>> {
        unimplemented!("not used by the engine")
    }
    async fn lookup(&self, _: &str) -> crate::pbx::Result<Vec<Registration>> {
        unimplemented!("not used by the engine")
    }
    async fn notify(&self, _: &Registration, _: &str) -> crate::pbx::Result<SipAnswer> {
        unimplemented!("not used by the engine")
    }
    async fn drop_registrations(&self, _: &str) -> crate::pbx::Result<()> {
        unimplemented!("not used by the engine")
    }
    async fn reset_users(&self, _: &[UserReset]) -> crate::pbx::Result<Vec<ResetOutcome>> {
        unimplemented!("not used by the engine")
    }
    async fn recycle_users(&self, _: &[NewIdentity]) -> crate::pbx::Result<Vec<ResetOutcome>> {
        unimplemented!("not used by the engine")
    }
}

#[derive(Default)]
pub struct Outbox {
    pub sent: Mutex<Vec<String>>,
}

#[async_trait]
impl crate::engine::users::Outbox for Outbox {
    async fn send(&self, to: &str, _: &str, _: String) -> Result<(), String> {
        self.sent.lock().unwrap().push(to.to_string());
        Ok(())
    }
}

/// A journal whose writes fail from the `crash_at`-th on: the process died there, so the
/// side effects before it happened and its record did not.
pub struct Journal {
    pub batches: Mutex<BTreeMap<usize, Vec<Row>>>,
    pub writes: AtomicUsize,
    pub crash_at: AtomicUsize,
}

#[async_trait]
impl crate::engine::Journal for Journal {
    async fn record(&self, index: usize, rows: &[Row]) -> Result<(), Error> {
        if self.writes.fetch_add(1, Ordering::SeqCst) >= self.crash_at.load(Ordering::SeqCst) {
            return Err(Error::Journal("killed".into()));
        }
        self.batches.lock().unwrap().insert(index, rows.to_vec());
        Ok(())
    }
}
