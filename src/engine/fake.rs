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
    // UserRecycle
    /// Every reset, registration drop and recycle that took effect, in order: (call, extension).
    pub recycle_log: Mutex<Vec<(&'static str, String)>>,
    /// A failure injected into reset_users, drop_registrations or recycle_users.
    pub fault: Mutex<Option<Fault>>,
    // PhoneRestart's window
    /// How long a Silent phone's NOTIFY waits before its 408 (tm's fr_timer); zero by default.
    pub silent_for: Mutex<std::time::Duration>,
    /// Every NOTIFY sent: (extension, contact, when it left).
    pub sent: Mutex<Vec<(String, String, std::time::Instant)>>,
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
        if take(&self.down_registrations) {
            return Err(down());
        }
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
        self.sent.lock().unwrap().push((
            to.extension.clone(),
            to.contact.clone(),
            std::time::Instant::now(),
        ));
        let lost = take(&self.down_notify);
        if answer == Answer::Silent {
            let wait = *self.silent_for.lock().unwrap();
            tokio::time::sleep(wait).await;
        }
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
impl crate::engine::outbox::Outbox for Outbox {
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

// Users: a PBX and a mail relay that fail on demand, and a journal that dies before or after a
// record and can be read back. They log every side effect and show each to a witness first, so
// a test can check that nothing runs twice and nothing runs before its intent is on record.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;

use crate::pbx::PbxError;
use crate::plan::stored::StepKind;

/// A side effect on a user, as the doubles below log it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// A user's field writes, committed.
    Write(String),
    /// An action that did something: (extension, its step).
    Action(String, StepKind),
    /// A mail the relay accepted: (address, its step).
    Mail(String, StepKind),
}

/// Shown each side effect before it is attempted.
pub type Witness = Box<dyn Fn(&Effect) + Send + Sync>;

/// The step of an action.
pub fn action_step(a: &UserAction) -> StepKind {
    match a {
        UserAction::ResetPassword(_) => StepKind::ResetPassword,
        UserAction::ResetTwoFactor => StepKind::ResetTwoFactor,
        UserAction::Lock => StepKind::Lock,
        UserAction::Unlock => StepKind::Unlock,
        UserAction::Remove => StepKind::Remove,
    }
}

/// The in-memory PBX behind faults: chosen calls fail transiently (after part of their work, as
/// a database going away mid-batch), chosen targets' writes are refused and chosen actions fail
/// (permanently), and an Atomic change is all or nothing.
#[derive(Default)]
pub struct Faulty {
    pub pbx: Pbx,
    /// Every side effect done, in order.
    pub effects: Mutex<Vec<Effect>>,
    /// Calls (reads, writes and actions counted together from 0) that fail transiently, each
    /// after this many of its targets were done.
    transient: Mutex<BTreeMap<usize, usize>>,
    calls: AtomicUsize,
    /// Extensions whose writes the database refuses.
    pub refused: Mutex<BTreeSet<String>>,
    /// Actions that fail: (extension, step).
    pub failing: Mutex<BTreeSet<(String, StepKind)>>,
    pub witness: Option<Witness>,
}

impl Faulty {
    /// Adds users with [`user`]'s values.
    pub fn with_users<'a>(extensions: impl IntoIterator<Item = &'a str>) -> Faulty {
        let f = Faulty::default();
        for e in extensions {
            f.pbx.users.lock().unwrap().insert(e.into(), user(e));
        }
        f
    }

    /// PBX calls made so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The `call`-th call (counted from 0 over the PBX's life) fails transiently after doing
    /// `after` of its targets (all of them if it has fewer).
    pub fn fail_call(&self, call: usize, after: usize) {
        self.transient.lock().unwrap().insert(call, after);
    }

    /// Forgets the transient faults not met yet.
    pub fn forget_transient(&self) {
        self.transient.lock().unwrap().clear();
    }

    /// Forgets every transient and permanent fault.
    pub fn heal(&self) {
        self.transient.lock().unwrap().clear();
        self.refused.lock().unwrap().clear();
        self.failing.lock().unwrap().clear();
    }

    /// This call's transient fault: after how many targets it fails.
    fn fault(&self) -> Option<usize> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        self.transient.lock().unwrap().get(&call).copied()
    }

    fn witness(&self, e: &Effect) {
        if let Some(w) = &self.witness {
            w(e);
        }
    }
}

/// An Atomic change's transaction on the fake PBX: writes land in the users at once (one
/// operator at a time in these tests) and are undone unless committed.
pub struct FaultyAtomic<'a> {
    f: &'a Faulty,
    before: BTreeMap<String, User>,
    written: Vec<Effect>,
    open: bool,
}

#[async_trait]
impl crate::pbx::AtomicWrites for FaultyAtomic<'_> {
    async fn apply(&mut self, changes: &[UserChange]) -> crate::pbx::Result<Vec<WriteOutcome>> {
        let fault = self.f.fault();
        let mut outcomes = Vec::new();
        for c in changes.iter().take(fault.unwrap_or(usize::MAX)) {
            let e = Effect::Write(c.extension.clone());
            self.f.witness(&e);
            let o = if self.f.refused.lock().unwrap().contains(&c.extension) {
                WriteOutcome::Failed(
                    PbxError::Refused("value violates check constraint".into()).to_string(),
                )
            } else {
                self.f
                    .pbx
                    .apply_user_changes(std::slice::from_ref(c), true)
                    .await?
                    .remove(0)
            };
            if o == WriteOutcome::Applied {
                self.written.push(e);
            }
            outcomes.push(o);
        }
        if fault.is_some() {
            return Err(PbxError::DatabaseBusy {
                target: "fake".into(),
                detail: "deadlock detected".into(),
            });
        }
        Ok(outcomes)
    }
    async fn commit(mut self: Box<Self>) -> crate::pbx::Result<Option<String>> {
        self.open = false;
        let written = std::mem::take(&mut self.written);
        self.f.effects.lock().unwrap().extend(written);
        Ok(None)
    }
    async fn rollback(self: Box<Self>) -> crate::pbx::Result<()> {
        Ok(())
    }
}

impl Drop for FaultyAtomic<'_> {
    fn drop(&mut self) {
        if self.open {
            *self.f.pbx.users.lock().unwrap() = std::mem::take(&mut self.before);
        }
    }
}

#[async_trait]
impl PbxBackend for Faulty {
    async fn begin_atomic(
        &self,
    ) -> crate::pbx::Result<Option<Box<dyn crate::pbx::AtomicWrites + '_>>> {
        if self.fault().is_some() {
            return Err(PbxError::DatabaseUnreachable {
                target: "fake".into(),
                detail: "connection refused".into(),
            });
        }
        Ok(Some(Box::new(FaultyAtomic {
            f: self,
            before: self.pbx.users.lock().unwrap().clone(),
            written: Vec::new(),
            open: true,
        })))
    }
    fn capabilities(&self) -> Capabilities {
        self.pbx.capabilities()
    }
    async fn probe(&self) -> crate::pbx::Result<Probe> {
        self.pbx.probe().await
    }
    async fn read_users(&self, s: &UserSelection) -> crate::pbx::Result<UserRead> {
        if self.fault().is_some() {
            return Err(PbxError::DatabaseUnreachable {
                target: "fake".into(),
                detail: "connection refused".into(),
            });
        }
        self.pbx.read_users(s).await
    }
    async fn extensions(&self) -> crate::pbx::Result<Vec<String>> {
        self.pbx.extensions().await
    }
    async fn number_holders(&self, n: &[String]) -> crate::pbx::Result<Vec<(String, String)>> {
        self.pbx.number_holders(n).await
    }
    async fn policies(&self) -> crate::pbx::Result<Policies> {
        self.pbx.policies().await
    }
    async fn apply_user_changes(
        &self,
        changes: &[UserChange],
        atomic: bool,
    ) -> crate::pbx::Result<Vec<WriteOutcome>> {
        let fault = self.fault();
        let before = self.pbx.users.lock().unwrap().clone();
        let mut outcomes = Vec::new();
        let mut written = Vec::new();
        for c in changes.iter().take(fault.unwrap_or(usize::MAX)) {
            let e = Effect::Write(c.extension.clone());
            self.witness(&e);
            let o = if self.refused.lock().unwrap().contains(&c.extension) {
                WriteOutcome::Failed(
                    PbxError::Refused("value violates check constraint".into()).to_string(),
                )
            } else {
                self.pbx
                    .apply_user_changes(std::slice::from_ref(c), atomic)
                    .await?
                    .remove(0)
            };
            if o == WriteOutcome::Applied {
                written.push(e);
            }
            outcomes.push(o);
        }
        let failed = outcomes.iter().any(|o| *o != WriteOutcome::Applied);
        if atomic && (fault.is_some() || failed) {
            *self.pbx.users.lock().unwrap() = before;
            written.clear();
            for o in outcomes.iter_mut().filter(|o| **o == WriteOutcome::Applied) {
                *o = WriteOutcome::RolledBack;
            }
        }
        self.effects.lock().unwrap().extend(written);
        if fault.is_some() {
            return Err(PbxError::DatabaseBusy {
                target: "fake".into(),
                detail: "deadlock detected".into(),
            });
        }
        Ok(outcomes)
    }
    async fn apply_actions(
        &self,
        actions: &[(String, UserAction)],
    ) -> crate::pbx::Result<Vec<ActionOutcome>> {
        let fault = self.fault();
        let mut outcomes = Vec::new();
        for (ext, a) in actions.iter().take(fault.unwrap_or(usize::MAX)) {
            let e = Effect::Action(ext.clone(), action_step(a));
            self.witness(&e);
            let o = if self
                .failing
                .lock()
                .unwrap()
                .contains(&(ext.clone(), action_step(a)))
            {
                ActionOutcome::Failed("the PBX refused the action".into())
            } else {
                self.pbx
                    .apply_actions(&[(ext.clone(), a.clone())])
                    .await?
                    .remove(0)
            };
            if o == ActionOutcome::Done {
                self.effects.lock().unwrap().push(e);
            }
            outcomes.push(o);
        }
        if fault.is_some() {
            return Err(PbxError::DatabaseUnreachable {
                target: "fake".into(),
                detail: "server closed the connection unexpectedly".into(),
            });
        }
        Ok(outcomes)
    }
    async fn read_phones(&self, s: &UserSelection) -> crate::pbx::Result<Vec<Phone>> {
        self.pbx.read_phones(s).await
    }
    async fn apply_phone_changes(
        &self,
        c: &[(i64, PhoneField, String, String)],
    ) -> crate::pbx::Result<Vec<WriteOutcome>> {
        self.pbx.apply_phone_changes(c).await
    }
    async fn registrations(&self) -> crate::pbx::Result<Vec<Registration>> {
        self.pbx.registrations().await
    }
    async fn lookup(&self, e: &str) -> crate::pbx::Result<Vec<Registration>> {
        self.pbx.lookup(e).await
    }
    async fn notify(&self, r: &Registration, e: &str) -> crate::pbx::Result<SipAnswer> {
        self.pbx.notify(r, e).await
    }
    async fn drop_registrations(&self, e: &str) -> crate::pbx::Result<()> {
        self.pbx.drop_registrations(e).await
    }
    async fn reset_users(&self, r: &[UserReset]) -> crate::pbx::Result<Vec<ResetOutcome>> {
        self.pbx.reset_users(r).await
    }
    async fn recycle_users(&self, i: &[NewIdentity]) -> crate::pbx::Result<Vec<ResetOutcome>> {
        self.pbx.recycle_users(i).await
    }
}

/// A mail relay that refuses chosen addresses and logs what it accepts.
#[derive(Default)]
pub struct Mailbox {
    /// Every mail accepted, in order.
    pub sent: Mutex<Vec<Effect>>,
    /// Addresses the relay refuses.
    pub refused: Mutex<BTreeSet<String>>,
    pub witness: Option<Witness>,
}

#[async_trait]
impl crate::engine::outbox::Outbox for Mailbox {
    async fn send(&self, to: &str, subject: &str, _: String) -> Result<(), String> {
        // The subjects of crate::mail: the welcome mail's starts with "Welcome".
        let kind = if subject.starts_with("Welcome") {
            StepKind::WelcomeMail
        } else {
            StepKind::ResetMail
        };
        let e = Effect::Mail(to.into(), kind);
        if let Some(w) = &self.witness {
            w(&e);
        }
        if self.refused.lock().unwrap().contains(to) {
            return Err(format!("550 5.1.1 <{to}>: mailbox unavailable"));
        }
        self.sent.lock().unwrap().push(e);
        Ok(())
    }
}

/// Where the process dies at the chosen record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kill {
    /// Before the record reaches the journal: what it records happened, the record did not.
    Before,
    /// Right after the record is stored: what follows it did not happen.
    After,
}

/// A journal, readable back as a [`crate::engine::Store`], whose process dies at a chosen
/// record; once dead it records nothing until [`DyingJournal::restart`].
#[derive(Default)]
pub struct DyingJournal {
    batches: Mutex<BTreeMap<usize, Vec<Row>>>,
    /// Every record stored, in order: (batch index, rows).
    log: Mutex<Vec<(usize, Vec<Row>)>>,
    kill: Mutex<Option<(usize, Kill)>>,
    dead: AtomicBool,
}

impl DyingJournal {
    pub fn new(batches: Vec<Vec<Row>>) -> DyingJournal {
        DyingJournal {
            batches: Mutex::new(batches.into_iter().enumerate().collect()),
            ..Default::default()
        }
    }

    /// Dies at the `record`-th record (counted from 0 over the journal's life).
    pub fn kill_at(&self, record: usize, kill: Kill) {
        *self.kill.lock().unwrap() = Some((record, kill));
    }

    /// A new operator: alive, and dying nowhere until told.
    pub fn restart(&self) {
        *self.kill.lock().unwrap() = None;
        self.dead.store(false, Ordering::SeqCst);
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Records stored so far.
    pub fn records(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    pub fn log(&self) -> Vec<(usize, Vec<Row>)> {
        self.log.lock().unwrap().clone()
    }

    pub fn batch(&self, index: usize) -> Vec<Row> {
        self.batches.lock().unwrap()[&index].clone()
    }

    /// Every batch's rows, in batch order.
    pub fn rows(&self) -> Vec<Row> {
        self.batches
            .lock()
            .unwrap()
            .values()
            .flatten()
            .cloned()
            .collect()
    }

    /// A target's row as last recorded.
    pub fn row(&self, target: &str) -> Option<Row> {
        let batches = self.batches.lock().unwrap();
        batches
            .values()
            .flatten()
            .find(|r| r.target == target)
            .cloned()
    }

    /// Stores a batch as something other than the engine would (an edit, a retry's plan).
    pub fn put(&self, index: usize, rows: Vec<Row>) {
        self.batches.lock().unwrap().insert(index, rows);
    }
}

#[async_trait]
impl crate::engine::Journal for DyingJournal {
    async fn record(&self, index: usize, rows: &[Row]) -> Result<(), Error> {
        if self.is_dead() {
            return Err(Error::Journal("killed".into()));
        }
        let mut log = self.log.lock().unwrap();
        let kill = *self.kill.lock().unwrap();
        let dies = kill.filter(|(at, _)| *at == log.len()).map(|(_, k)| k);
        if dies == Some(Kill::Before) {
            self.dead.store(true, Ordering::SeqCst);
            return Err(Error::Journal("killed".into()));
        }
        log.push((index, rows.to_vec()));
        self.batches.lock().unwrap().insert(index, rows.to_vec());
        if dies == Some(Kill::After) {
            self.dead.store(true, Ordering::SeqCst);
            return Err(Error::Journal("killed".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl crate::engine::Store for DyingJournal {
    async fn load(&self, index: usize) -> Result<Vec<Row>, Error> {
        self.batches
            .lock()
            .unwrap()
            .get(&index)
            .cloned()
            .ok_or_else(|| Error::Journal(format!("no batch {index}")))
    }
}
