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
use crate::plan::recycle::{PASSWORD_REQUIRED, SETUP_REQUIRED};
use crate::plan::stored::Row;

#[derive(Default)]
pub struct Pbx {
    pub users: Mutex<BTreeMap<String, User>>,
    pub resets: Mutex<BTreeMap<String, u32>>,
    // UserRecycle
    /// Every reset, registration drop and recycle that took effect, in order: (call, extension).
    pub recycle_log: Mutex<Vec<(&'static str, String)>>,
    /// A failure injected into reset_users, drop_registrations or recycle_users.
    pub fault: Mutex<Option<Fault>>,
}

/// A failure of one of the UserRecycle calls, named as the log names them ("reset", "drop",
/// "recycle").
#[derive(Clone, Debug)]
pub enum Fault {
    /// The call dies (a crash, an outage) once `after` more targets took effect in it: a
    /// transient error, once.
    Crash { call: &'static str, after: usize },
    /// The call refuses this target for good, every time.
    Refuse { call: &'static str, target: String },
}

enum Hit {
    Go,
    Crash,
    Refuse,
}

impl Pbx {
    /// What an injected fault does to `call` on `target`.
    fn hit(&self, call: &'static str, target: &str) -> Hit {
        let mut fault = self.fault.lock().unwrap();
        match &mut *fault {
            Some(Fault::Crash { call: c, after }) if *c == call => {
                if *after == 0 {
                    *fault = None;
                    Hit::Crash
                } else {
                    *after -= 1;
                    Hit::Go
                }
            }
            Some(Fault::Refuse { call: c, target: t }) if *c == call && t == target => Hit::Refuse,
            _ => Hit::Go,
        }
    }

    /// Resets or recycles each target, as `apply` says, unless a fault stops it.
    fn reset_or_recycle<'a>(
        &self,
        call: &'static str,
        targets: impl Iterator<Item = &'a str>,
        apply: impl Fn(&str, &mut User),
    ) -> crate::pbx::Result<Vec<ResetOutcome>> {
        let mut out = Vec::new();
        for ext in targets {
            match self.hit(call, ext) {
                Hit::Crash => return Err(killed()),
                Hit::Refuse => {
                    out.push(ResetOutcome::Failed("refused by the fake PBX".into()));
                    continue;
                }
                Hit::Go => {}
            }
            let mut users = self.users.lock().unwrap();
            let Some(user) = users.get_mut(ext) else {
                out.push(ResetOutcome::NotFound);
                continue;
            };
            let before = user.clone();
            apply(ext, user);
            self.recycle_log
                .lock()
                .unwrap()
                .push((call, ext.to_string()));
            out.push(ResetOutcome::Done {
                before,
                unassigned: vec![],
            });
        }
        Ok(out)
    }
}

fn killed() -> crate::pbx::PbxError {
    crate::pbx::PbxError::DatabaseBusy {
        target: "the fake PBX".into(),
        detail: "killed".into(),
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
    async fn drop_registrations(&self, extension: &str) -> crate::pbx::Result<()> {
        match self.hit("drop", extension) {
            Hit::Crash => Err(killed()),
            Hit::Refuse => Err(crate::pbx::PbxError::Refused(
                "refused by the fake PBX".into(),
            )),
            Hit::Go => {
                let entry = ("drop", extension.to_string());
                self.recycle_log.lock().unwrap().push(entry);
                Ok(())
            }
        }
    }
    async fn reset_users(&self, resets: &[UserReset]) -> crate::pbx::Result<Vec<ResetOutcome>> {
        use crate::pbx::ResetPart as P;
        use UserField as F;
        let parts = |ext: &str| {
            resets
                .iter()
                .find(|r| r.extension == ext)
                .map(|r| r.parts.clone())
                .unwrap_or_default()
        };
        self.reset_or_recycle(
            "reset",
            resets.iter().map(|r| r.extension.as_str()),
            |ext, user| {
                for part in parts(ext) {
                    let fields: &[UserField] = match part {
                        P::Name => &[F::FirstName, F::LastName],
                        P::Email => &[F::Email],
                        P::VoicemailPin => &[F::VoicemailPin],
                        P::Role => &[F::Role],
                        P::Groups => &[F::Groups],
                        P::CallGroup => &[F::CallGroup],
                        P::PickupGroup => &[F::PickupGroup],
                        P::Numbers => {
                            user.numbers.clear();
                            &[
                                F::PrimaryNumberLocation,
                                F::PrivateNumber,
                                F::PrivateNumberLocation,
                            ]
                        }
                        P::Password => {
                            user.values.insert(F::Password, rotated());
                            &[]
                        }
                        P::Devices => &[],
                    };
                    for f in fields {
                        user.values.remove(f);
                    }
                }
                user.values.insert(F::Status, SETUP_REQUIRED.into());
            },
        )
    }
    async fn recycle_users(
        &self,
        identities: &[NewIdentity],
    ) -> crate::pbx::Result<Vec<ResetOutcome>> {
        self.reset_or_recycle(
            "recycle",
            identities.iter().map(|i| i.extension.as_str()),
            |ext, user| {
                let id = identities.iter().find(|i| i.extension == ext).unwrap();
                let v = &mut user.values;
                v.insert(UserField::FirstName, id.first_name.clone());
                v.insert(UserField::LastName, id.last_name.clone());
                match &id.email {
                    Some(e) => v.insert(UserField::Email, e.clone()),
                    None => v.remove(&UserField::Email),
                };
                v.insert(UserField::Password, rotated());
                v.remove(&UserField::VoicemailPin);
                v.insert(UserField::Status, PASSWORD_REQUIRED.into());
            },
        )
    }
}

/// A SIP secret nobody knows.
fn rotated() -> String {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    format!("ha1:rotated-{}", N.fetch_add(1, Ordering::SeqCst))
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
