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
    /// Provisioned phones by id.
    pub phones: Mutex<BTreeMap<i64, Phone>>,
    /// Live registrations.
    pub registered: Mutex<Vec<Registration>>,
    /// NOTIFYs each extension's phone received.
    pub notifies: Mutex<BTreeMap<String, u32>>,
    /// How each extension's phone answers a NOTIFY (default: it reboots).
    pub answers: Mutex<BTreeMap<String, Answer>>,
    /// Phone ids whose writes the database refuses (the whole transaction fails).
    pub refuse: Mutex<std::collections::BTreeSet<i64>>,
    /// This many next calls of `registrations`, `notify` and `apply_phone_changes` (each its own
    /// counter) fail as an unreachable PBX does.
    pub down_registrations: AtomicUsize,
    pub down_notify: AtomicUsize,
    pub down_writes: AtomicUsize,
}

/// How a fake phone answers a NOTIFY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// 200, then it registers again with a new Call-ID.
    Reboot,
    /// 200, and it does not register again.
    Stays,
    /// No answer: 408.
    Silent,
    /// A value the backend refuses to put into SIP (a permanent error).
    Unsafe,
}

/// A registered phone of `ext`.
pub fn registration(ext: &str) -> Registration {
    Registration {
        extension: ext.into(),
        contact: format!("sip:{ext}@192.0.2.1:5060"),
        received: None,
        socket: None,
        user_agent: "Yealink SIP-T46S 66.86.0.15".into(),
        call_id: format!("cid-{ext}-1"),
        last_modified: 1,
        expires: 3600,
    }
}

fn take(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

fn down() -> crate::pbx::PbxError {
    crate::pbx::PbxError::RpcUnreachable {
        url: "http://pbx.test".into(),
        detail: "connection refused or unreachable".into(),
    }
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
    async fn read_phones(&self, s: &UserSelection) -> crate::pbx::Result<Vec<Phone>> {
        Ok(self
            .phones
            .lock()
            .unwrap()
            .values()
            .filter(|p| p.owner.as_ref().is_some_and(|o| s.extensions.contains(o)))
            .cloned()
            .collect())
    }
    async fn apply_phone_changes(
        &self,
        changes: &[(i64, PhoneField, String, String)],
    ) -> crate::pbx::Result<Vec<WriteOutcome>> {
        if take(&self.down_writes) {
            return Err(crate::pbx::PbxError::DatabaseUnreachable {
                target: "db.test".into(),
                detail: "connection refused".into(),
            });
        }
        let refuse = self.refuse.lock().unwrap();
        if let Some(id) = changes.iter().map(|c| c.0).find(|id| refuse.contains(id)) {
            return Err(crate::pbx::PbxError::Refused(format!(
                "phone {id}: value refused"
            )));
        }
        // One transaction: every write or none.
        let mut phones = self.phones.lock().unwrap();
        let mut after = phones.clone();
        let outcomes = changes
            .iter()
            .map(|(id, field, from, to)| {
                let Some(p) = after.get_mut(id) else {
                    return WriteOutcome::NotFound;
                };
                let value = match field {
                    PhoneField::Model => &mut p.model,
                    PhoneField::Label => p.label.get_or_insert_with(String::new),
                };
                if value != from {
                    return WriteOutcome::Conflict {
                        field: UserField::Status,
                        expected: Some(from.clone()),
                        found: None,
                    };
                }
                *value = to.clone();
                WriteOutcome::Applied
            })
            .collect();
        *phones = after;
        Ok(outcomes)
    }
    async fn registrations(&self) -> crate::pbx::Result<Vec<Registration>> {
        if take(&self.down_registrations) {
            return Err(down());
        }
        Ok(self.registered.lock().unwrap().clone())
    }
    async fn lookup(&self, ext: &str) -> crate::pbx::Result<Vec<Registration>> {
        Ok(self
            .registered
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.extension == ext)
            .cloned()
            .collect())
    }
    /// A NOTIFY while the PBX is "down" reached the phone, but its answer was lost: the worst
    /// case for sending twice.
    async fn notify(&self, to: &Registration, _: &str) -> crate::pbx::Result<SipAnswer> {
        let answer = self
            .answers
            .lock()
            .unwrap()
            .get(&to.extension)
            .copied()
            .unwrap_or(Answer::Reboot);
        if answer == Answer::Unsafe {
            return Err(crate::pbx::PbxError::Unsafe {
                what: "the registered contact".into(),
                reason: "it is not a plain SIP URI".into(),
            });
        }
        *self
            .notifies
            .lock()
            .unwrap()
            .entry(to.extension.clone())
            .or_default() += 1;
        let lost = take(&self.down_notify);
        let answer = match answer {
            Answer::Silent => SipAnswer {
                code: 408,
                reason: "Request Timeout".into(),
            },
            Answer::Reboot => {
                let mut regs = self.registered.lock().unwrap();
                for r in regs.iter_mut().filter(|r| r.extension == to.extension) {
                    r.call_id = format!("{}-again", r.call_id);
                    r.last_modified += 1;
                }
                SipAnswer {
                    code: 200,
                    reason: "OK".into(),
                }
            }
            _ => SipAnswer {
                code: 200,
                reason: "OK".into(),
            },
        };
        if lost {
            return Err(down());
        }
        Ok(answer)
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
