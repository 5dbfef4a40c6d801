//! Phone planning: the phones of the selected users, matched to their live registrations,
//! narrowed by model and vendor (provisioning data and the User-Agent both tell the vendor);
//! the stored rows of a PhoneRestart (and of its retry) and of a BulkPhoneChange, with the
//! BulkPhoneChange's plan: its Open fields, the one-vendor rule for a model, and its hash.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sha2::{Digest as _, Sha256};

use super::PlanError;
use super::stored::{PhoneTarget, Row, Step, StepKind, StoredWrite};
use crate::api::{BulkPhoneChangeSpec, FieldChange, Lock, Outcome, Plan};
use crate::pbx::{Phone, PhoneField, Registration, sip};

/// Filters of a phone selection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PhoneFilter {
    pub exclude: Vec<String>,
    pub models: Vec<String>,
    pub vendors: Vec<String>,
    pub max_targets: Option<u32>,
}

/// One phone to act on: what provisioning knows, and its registration if it has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectedPhone {
    /// The provisioning record's id, for phones the PBX knows.
    pub id: Option<i64>,
    pub extension: String,
    pub mac: Option<String>,
    pub vendor: Option<String>,
    pub model: Option<String>,
    pub registration: Option<Registration>,
}

impl SelectedPhone {
    /// How results name it: `extension/MAC`, or `extension/<contact>` for an unprovisioned phone.
    pub fn target(&self) -> String {
        match (&self.mac, &self.registration) {
            (Some(mac), _) => format!("{}/{mac}", self.extension),
            (None, Some(r)) => format!("{}/{}", self.extension, r.contact),
            (None, None) => self.extension.clone(),
        }
    }
}

fn same(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Matches provisioned phones and registrations of the `users`, then filters.
/// A provisioned phone without a registration is kept (it reports NotRegistered); a registration
/// without provisioning is kept with the vendor and model its User-Agent names.
pub fn select(
    users: &[String],
    phones: &[Phone],
    registrations: &[Registration],
    filter: &PhoneFilter,
) -> Result<Vec<SelectedPhone>, PlanError> {
    let exclude: BTreeSet<&str> = filter.exclude.iter().map(String::as_str).collect();
    let users: BTreeSet<&str> = users
        .iter()
        .map(String::as_str)
        .filter(|u| !exclude.contains(u))
        .collect();
    let mut by_user: BTreeMap<&str, (Vec<&Phone>, Vec<&Registration>)> = BTreeMap::new();
    for p in phones {
        if let Some(owner) = p.owner.as_deref().filter(|o| users.contains(o)) {
            by_user.entry(owner).or_default().0.push(p);
        }
    }
    for r in registrations {
        if users.contains(r.extension.as_str()) {
            by_user.entry(r.extension.as_str()).or_default().1.push(r);
        }
    }
    let mut out = Vec::new();
    for (user, (phones, regs)) in by_user {
        let mut free: Vec<&Registration> = regs;
        for p in phones {
            // The registration whose User-Agent names this phone's vendor (and model, if it says).
            let pick = free
                .iter()
                .position(|r| {
                    sip::vendor_from_user_agent(&r.user_agent).is_some_and(|v| same(v, &p.vendor))
                        && sip::model_from_user_agent(&r.user_agent).is_none_or(|m| {
                            same(&m, &p.model)
                                || same(
                                    &m.replace(['-', '_', ' '], ""),
                                    &p.model.replace(['-', '_', ' '], ""),
                                )
                        })
                })
                .or_else(|| {
                    free.iter().position(|r| {
                        sip::vendor_from_user_agent(&r.user_agent)
                            .is_some_and(|v| same(v, &p.vendor))
                    })
                });
            let registration = pick.map(|i| free.remove(i).clone());
            out.push(SelectedPhone {
                id: Some(p.id),
                extension: user.to_string(),
                mac: Some(p.mac.clone()),
                vendor: Some(p.vendor.clone()),
                model: Some(p.model.clone()),
                registration,
            });
        }
        for r in free {
            out.push(SelectedPhone {
                id: None,
                extension: user.to_string(),
                mac: None,
                vendor: sip::vendor_from_user_agent(&r.user_agent).map(str::to_string),
                model: sip::model_from_user_agent(&r.user_agent),
                registration: Some(r.clone()),
            });
        }
    }
    out.retain(|p| {
        let vendor_ok = filter.vendors.is_empty()
            || p.vendor
                .as_deref()
                .is_some_and(|v| filter.vendors.iter().any(|f| same(f, v)));
        let model_ok = filter.models.is_empty()
            || p.model
                .as_deref()
                .is_some_and(|m| filter.models.iter().any(|f| same(f, m)));
        vendor_ok && model_ok
    });
    out.sort_by(|a, b| {
        crate::pbx::extension_order(&a.extension, &b.extension).then(a.target().cmp(&b.target()))
    });
    if let Some(max) = filter.max_targets
        && out.len() > max as usize
    {
        return Err(PlanError::TooManyTargets {
            found: out.len(),
            max,
        });
    }
    Ok(out)
}

/// The vendors among the selected phones (BulkPhoneChange assigns a model only to one vendor).
pub fn vendors(phones: &[SelectedPhone]) -> BTreeSet<String> {
    phones.iter().filter_map(|p| p.vendor.clone()).collect()
}

/// The steps of a phone restart: the NOTIFY, then the watch for the phone's fresh REGISTER.
pub fn restart_steps() -> Vec<Step> {
    vec![
        Step::pending(StepKind::Notify),
        Step::pending(StepKind::Confirm),
    ]
}

/// A selected phone as a PhoneRestart stores it: a registered phone is Planned with its steps and
/// its registration as it was (to recognise the fresh REGISTER); another is NotRegistered.
pub fn restart_row(p: SelectedPhone) -> Row {
    let target = p.target();
    let r = p.registration;
    let (outcome, notes, steps) = match &r {
        Some(_) => (Outcome::Planned, vec![], restart_steps()),
        None => (
            Outcome::NotRegistered,
            vec!["no live SIP registration: not restarted".into()],
            vec![],
        ),
    };
    Row {
        target,
        outcome,
        notes,
        steps,
        phone: Some(PhoneTarget {
            id: p.id,
            extension: p.extension,
            mac: p.mac,
            vendor: p.vendor,
            model: p.model,
            contact: r.as_ref().map(|r| r.contact.clone()),
            received: r.as_ref().and_then(|r| r.received.clone()),
            socket: r.as_ref().and_then(|r| r.socket.clone()),
            user_agent: r.as_ref().map(|r| r.user_agent.clone()).unwrap_or_default(),
            call_id: r.as_ref().map(|r| r.call_id.clone()).unwrap_or_default(),
            last_modified: r.as_ref().map(|r| r.last_modified).unwrap_or(0),
            sent_at: None,
            sent_to: None,
            confirmed_at: None,
        }),
        ..Default::default()
    }
}

/// Whether a retry sends a phone's NOTIFY once more: only when it failed, or may not have been
/// sent (Uncertain). A phone that restarted or accepted its NOTIFY is never sent another.
pub fn needs_retry(row: &Row) -> bool {
    matches!(row.outcome, Outcome::Failed | Outcome::Uncertain)
}

/// A retry of a restart: the earlier run's rows, each kept as it ended except those that
/// [`needs_retry`], which are planned again from `fresh` (the same phones as selected and
/// registered now: a phone that rebooted since has a new registration to recognise). A phone to
/// retry that is no longer selected keeps its earlier row, with a note.
pub fn retry_rows(earlier: Vec<Row>, fresh: Vec<Row>) -> Vec<Row> {
    let mut fresh: HashMap<String, Row> =
        fresh.into_iter().map(|r| (r.target.clone(), r)).collect();
    earlier
        .into_iter()
        .map(|old| {
            if !needs_retry(&old) {
                return old;
            }
            match fresh.remove(&old.target) {
                Some(mut again) => {
                    again.notes.insert(
                        0,
                        format!("retried: was {:?} ({})", old.outcome, old.notes.join("; ")),
                    );
                    again
                }
                None => {
                    let mut kept = old;
                    kept.notes
                        .push("not retried: the phone is no longer selected".into());
                    kept
                }
            }
        })
        .collect()
}

/// A restart's plan for status: its phones, how many are to be sent a NOTIFY, and as its hash
/// the digest of every row's plan. The batch digests are added once the batches are stored.
pub fn restart_plan(rows: &[Row], generation: i64) -> Plan {
    Plan {
        hash: super::stored::plan_digest(rows),
        generation,
        targets: rows.len() as u32,
        resolved: rows.iter().take(1000).map(|r| r.target.clone()).collect(),
        changes: rows
            .iter()
            .filter(|r| r.outcome == Outcome::Planned)
            .count() as u32,
        ..Default::default()
    }
}

/// A fingerprint of what a BulkPhoneChange asks, without how (mode) or who (requestedBy), so
/// that switching a validated change to Execute executes exactly the validated plan.
pub fn change_spec_hash(spec: &BulkPhoneChangeSpec) -> String {
    let mut v = serde_json::to_value(spec).expect("specs serialize");
    if let Some(o) = v.as_object_mut() {
        for k in ["mode", "approvedPlanHash", "requestedBy"] {
            o.remove(k);
        }
    }
    hex::encode(Sha256::digest(v.to_string().as_bytes()))
}

/// The fields a BulkPhoneChange names, each with whether its lock is Open (only those are
/// written) and its value.
fn named_fields(spec: &BulkPhoneChangeSpec) -> Vec<(PhoneField, bool, String)> {
    let f = &spec.fields;
    let mut out = Vec::new();
    if let Some(m) = &f.model {
        out.push((PhoneField::Model, m.lock == Lock::Open, m.value.0.clone()));
    }
    if let Some(l) = &f.label {
        out.push((PhoneField::Label, l.lock == Lock::Open, l.value.0.clone()));
    }
    out
}

/// The Open fields of a change, as (field, value).
pub fn open_fields(spec: &BulkPhoneChangeSpec) -> Vec<(PhoneField, String)> {
    named_fields(spec)
        .into_iter()
        .filter(|(_, open, _)| *open)
        .map(|(f, _, v)| (f, v))
        .collect()
}

pub fn phone_field(name: &str) -> Option<PhoneField> {
    [PhoneField::Model, PhoneField::Label]
        .into_iter()
        .find(|f| f.name() == name)
}

/// The plan of a BulkPhoneChange over the selected phones (provisioned ones only: a write needs
/// the provisioning record): per phone, compare-and-set writes of its Open fields that differ,
/// and a [`StepKind::PhoneWrite`] step when there are any. A model is assigned only when every
/// selected phone has the same vendor.
pub fn plan_change(
    spec: &BulkPhoneChangeSpec,
    generation: i64,
    selected: &[SelectedPhone],
    provisioned: &[Phone],
) -> Result<(Vec<Row>, Plan), PlanError> {
    let selected: Vec<&SelectedPhone> = selected.iter().filter(|p| p.id.is_some()).collect();
    let named = named_fields(spec);
    let open = open_fields(spec);
    let vendors: BTreeSet<String> = selected.iter().filter_map(|p| p.vendor.clone()).collect();
    if open.iter().any(|(f, _)| *f == PhoneField::Model) && vendors.len() > 1 {
        let list = vendors.into_iter().collect::<Vec<_>>().join(", ");
        return Err(PlanError::Invalid(format!(
            "a model can only be assigned to phones of one vendor, and the selection has phones of {list}: narrow spec.targets.vendors to one of them; nothing was changed"
        )));
    }
    let labels: HashMap<i64, &str> = provisioned
        .iter()
        .map(|x| (x.id, x.label.as_deref().unwrap_or_default()))
        .collect();
    let current = |p: &SelectedPhone, f: PhoneField| -> String {
        match f {
            PhoneField::Model => p.model.clone().unwrap_or_default(),
            PhoneField::Label => {
                p.id.and_then(|id| labels.get(&id))
                    .map(|l| l.to_string())
                    .unwrap_or_default()
            }
        }
    };
    let mut common = BTreeMap::new();
    for (f, _, _) in &named {
        let mut values = selected.iter().map(|p| current(p, *f));
        if let Some(first) = values.next() {
            let same = values.all(|v| v == first);
            common.insert(f.name().to_string(), same.then_some(first));
        }
    }
    let mut hasher = Sha256::new();
    let mut rows = Vec::new();
    for p in &selected {
        let mut writes = Vec::new();
        let mut changes = Vec::new();
        for (f, value) in &open {
            let from = current(p, *f);
            hasher.update(format!("{}\t{}\t{from}\t{value}\n", p.target(), f.name()).as_bytes());
            if from != *value {
                writes.push(StoredWrite {
                    field: f.name().into(),
                    from: Some(from.clone()),
                    to: Some(value.clone()),
                    secret: false,
                });
                changes.push(FieldChange {
                    field: f.name().into(),
                    from: Some(from),
                    to: Some(value.clone()),
                });
            }
        }
        let (outcome, steps) = if writes.is_empty() {
            (Outcome::Unchanged, vec![])
        } else {
            (Outcome::Planned, vec![Step::pending(StepKind::PhoneWrite)])
        };
        rows.push(Row {
            target: p.target(),
            outcome,
            writes,
            changes,
            steps,
            phone: Some(PhoneTarget {
                id: p.id,
                extension: p.extension.clone(),
                mac: p.mac.clone(),
                vendor: p.vendor.clone(),
                model: p.model.clone(),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let plan = Plan {
        hash: hex::encode(hasher.finalize()),
        generation,
        targets: rows.len() as u32,
        resolved: rows.iter().take(1000).map(|r| r.target.clone()).collect(),
        common_values: common,
        closed_fields: named
            .iter()
            .filter(|(_, open, _)| !open)
            .map(|(f, _, _)| f.name().to_string())
            .collect(),
        changes: rows
            .iter()
            .filter(|r| r.outcome == Outcome::Planned)
            .count() as u32,
        spec_hash: change_spec_hash(spec),
        csv: None,
        batch_digests: vec![],
    };
    Ok((rows, plan))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BulkPhoneChangeSpec, ConnectionRef, Field, Mode, PhoneFields, PhoneTargets};

    fn phone(id: i64, owner: &str, vendor: &str, model: &str) -> Phone {
        Phone {
            id,
            mac: format!("mac{id}"),
            vendor: vendor.into(),
            model: model.into(),
            owner: Some(owner.into()),
            label: None,
        }
    }

    fn reg(ext: &str, ua: &str) -> Registration {
        Registration {
            extension: ext.into(),
            contact: format!("sip:{ext}@127.0.0.1:5070"),
            received: None,
            socket: None,
            user_agent: ua.into(),
            call_id: format!("cid-{ext}"),
            last_modified: 1,
            expires: 3600,
        }
    }

    fn users(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn provisioned_phones_meet_their_registrations() {
        let phones = [
            phone(1, "201", "Yealink", "SIP-T46S"),
            phone(2, "202", "Poly", "VVX 450"),
        ];
        let regs = [
            reg("201", "Yealink SIP-T46S 66.86.0.15"),
            reg("203", "snomD785/10.1"),
        ];
        let got = select(
            &users(&["201", "202", "203"]),
            &phones,
            &regs,
            &PhoneFilter::default(),
        )
        .unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].target(), "201/mac1");
        assert!(got[0].registration.is_some());
        assert_eq!(got[1].target(), "202/mac2");
        assert!(
            got[1].registration.is_none(),
            "202's phone is not registered"
        );
        assert_eq!(
            got[2].vendor.as_deref(),
            Some("Snom"),
            "an unprovisioned phone's vendor comes from its User-Agent"
        );
    }

    #[test]
    fn model_vendor_and_exclude_filters() {
        let phones = [
            phone(1, "201", "Yealink", "SIP-T46S"),
            phone(2, "202", "Yealink", "SIP-T54W"),
            phone(3, "203", "Cisco", "CP-8841"),
        ];
        let all = users(&["201", "202", "203"]);
        let only_t46s = PhoneFilter {
            models: vec!["sip-t46s".into()],
            ..Default::default()
        };
        assert_eq!(select(&all, &phones, &[], &only_t46s).unwrap().len(), 1);
        let yealink = PhoneFilter {
            vendors: vec!["Yealink".into()],
            exclude: vec!["202".into()],
            ..Default::default()
        };
        let got = select(&all, &phones, &[], &yealink).unwrap();
        assert_eq!(
            got.iter().map(|p| p.target()).collect::<Vec<_>>(),
            ["201/mac1"]
        );
        assert_eq!(
            vendors(&select(&all, &phones, &[], &PhoneFilter::default()).unwrap()).len(),
            2
        );
        let max = PhoneFilter {
            max_targets: Some(2),
            ..Default::default()
        };
        assert!(matches!(
            select(&all, &phones, &[], &max),
            Err(PlanError::TooManyTargets { found: 3, max: 2 })
        ));
    }

    #[test]
    fn phones_of_unselected_users_are_ignored() {
        let phones = [
            phone(1, "201", "Yealink", "SIP-T46S"),
            phone(2, "299", "Yealink", "SIP-T46S"),
        ];
        let regs = [reg("299", "Yealink SIP-T46S 1")];
        assert_eq!(
            select(&users(&["201"]), &phones, &regs, &PhoneFilter::default())
                .unwrap()
                .len(),
            1
        );
    }

    fn selected(id: i64, ext: &str, vendor: &str, model: &str, registered: bool) -> SelectedPhone {
        SelectedPhone {
            id: Some(id),
            extension: ext.into(),
            mac: Some(format!("mac{id}")),
            vendor: Some(vendor.into()),
            model: Some(model.into()),
            registration: registered.then(|| reg(ext, &format!("{vendor} {model} 1"))),
        }
    }

    #[test]
    fn a_registered_phone_is_planned_with_its_steps_and_registration() {
        let row = restart_row(selected(1, "201", "Yealink", "SIP-T46S", true));
        assert_eq!(row.target, "201/mac1");
        assert_eq!(row.outcome, Outcome::Planned);
        assert_eq!(row.steps, restart_steps());
        let p = row.phone.unwrap();
        assert_eq!(
            (p.call_id.as_str(), p.last_modified, p.sent_at),
            ("cid-201", 1, None)
        );
        let off = restart_row(selected(2, "202", "Yealink", "SIP-T46S", false));
        assert_eq!(off.outcome, Outcome::NotRegistered);
        assert!(off.steps.is_empty(), "nothing to do for it");
        assert_eq!(off.notes, ["no live SIP registration: not restarted"]);
    }

    #[test]
    fn a_retry_plans_again_exactly_the_failed_and_uncertain_phones() {
        let ended = |ext: &str, outcome| Row {
            outcome,
            notes: vec!["why".into()],
            ..restart_row(selected(
                ext.parse().unwrap(),
                ext,
                "Yealink",
                "SIP-T46S",
                true,
            ))
        };
        let earlier = vec![
            ended("201", Outcome::Restarted),
            ended("202", Outcome::Accepted),
            ended("203", Outcome::Failed),
            ended("204", Outcome::Uncertain),
            ended("205", Outcome::NotRegistered),
            ended("206", Outcome::Expired),
            ended("207", Outcome::Failed),
        ];
        // 207 is no longer selected; every other phone is, with its registration of now.
        let fresh: Vec<Row> = (201..=206)
            .map(|e| restart_row(selected(e, &e.to_string(), "Yealink", "SIP-T46S", true)))
            .collect();
        let rows = retry_rows(earlier.clone(), fresh);
        let planned: Vec<&str> = rows
            .iter()
            .filter(|r| r.outcome == Outcome::Planned)
            .map(|r| r.target.as_str())
            .collect();
        assert_eq!(planned, ["203/mac203", "204/mac204"]);
        assert_eq!(rows[2].notes, ["retried: was Failed (why)"]);
        assert_eq!(rows[2].steps, restart_steps());
        for i in [0, 1, 4, 5] {
            assert_eq!(rows[i], earlier[i], "kept as it ended");
        }
        assert_eq!(rows[6].outcome, Outcome::Failed);
        assert_eq!(
            rows[6].notes,
            ["why", "not retried: the phone is no longer selected"]
        );
    }

    fn change(model: Option<Lock>, label: Option<Lock>) -> BulkPhoneChangeSpec {
        BulkPhoneChangeSpec {
            connection_ref: ConnectionRef {
                name: "acme".into(),
            },
            targets: PhoneTargets::default(),
            fields: PhoneFields {
                model: model.map(|lock| Field {
                    value: crate::api::fields::ModelName("SIP-T54W".into()),
                    lock,
                }),
                label: label.map(|lock| Field {
                    value: crate::api::fields::ShortText("3rd floor".into()),
                    lock,
                }),
            },
            mode: Mode::Validate,
            approved_plan_hash: None,
            not_before: None,
            execute_before: None,
            revert_of: None,
            requested_by: None,
        }
    }

    #[test]
    fn a_model_is_planned_only_for_phones_of_one_vendor() {
        let spec = change(Some(Lock::Open), None);
        let mixed = [
            selected(1, "201", "Yealink", "SIP-T46S", false),
            selected(2, "202", "Poly", "VVX 450", false),
        ];
        let err = plan_change(&spec, 1, &mixed, &[]).unwrap_err();
        assert!(
            err.to_string().contains("one vendor") && err.to_string().contains("Poly, Yealink"),
            "{err}"
        );
        // A closed model is only reported: any vendors may be selected.
        let closed = change(Some(Lock::Closed), Some(Lock::Open));
        let (rows, plan) = plan_change(&closed, 1, &mixed, &[]).unwrap();
        assert_eq!(plan.closed_fields, ["model"]);
        assert_eq!(plan.common_values["model"], None, "they differ");
        assert!(
            rows.iter()
                .all(|r| r.writes.len() == 1 && r.writes[0].field == "label")
        );
    }

    #[test]
    fn a_change_plans_compare_and_set_writes_of_open_fields_that_differ() {
        let spec = change(Some(Lock::Open), Some(Lock::Closed));
        let phones = [
            selected(1, "201", "Yealink", "SIP-T46S", true),
            selected(2, "202", "Yealink", "SIP-T54W", false),
            // Not provisioned: nothing to write to.
            SelectedPhone {
                id: None,
                ..selected(3, "203", "Yealink", "SIP-T46S", true)
            },
        ];
        let provisioned = [Phone {
            label: Some("lobby".into()),
            ..phone(1, "201", "Yealink", "SIP-T46S")
        }];
        let (rows, plan) = plan_change(&spec, 7, &phones, &provisioned).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].outcome, Outcome::Planned);
        assert_eq!(rows[0].steps, [Step::pending(StepKind::PhoneWrite)]);
        assert_eq!(
            rows[0].writes,
            [StoredWrite {
                field: "model".into(),
                from: Some("SIP-T46S".into()),
                to: Some("SIP-T54W".into()),
                secret: false
            }]
        );
        assert_eq!(rows[1].outcome, Outcome::Unchanged);
        assert!(rows[1].steps.is_empty());
        assert_eq!((plan.targets, plan.changes, plan.generation), (2, 1, 7));
        assert_eq!(plan.common_values["model"], None);
        assert_eq!(plan.common_values["label"], None, "lobby and unset");
        assert_eq!(plan.closed_fields, ["label"]);
        assert_eq!(plan.spec_hash, change_spec_hash(&spec));
        // The hash pins the targets and values, not how or who.
        let again = BulkPhoneChangeSpec {
            mode: Mode::Execute,
            requested_by: Some("alice".into()),
            ..spec.clone()
        };
        let (_, plan2) = plan_change(&again, 8, &phones, &provisioned).unwrap();
        assert_eq!(
            (plan2.hash, plan2.spec_hash),
            (plan.hash.clone(), plan.spec_hash)
        );
        let (_, moved) = plan_change(&spec, 7, &phones[1..], &provisioned).unwrap();
        assert_ne!(moved.hash, plan.hash);
        assert_eq!(phone_field("label"), Some(PhoneField::Label));
        assert_eq!(phone_field("mac"), None);
    }
}
