//! Phone selection: the phones of the selected users, matched to their live registrations,
//! narrowed by model and vendor. Provisioning data and the User-Agent both tell the vendor.

use std::collections::{BTreeMap, BTreeSet};

use super::PlanError;
use crate::pbx::{Phone, Registration, sip};

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
    if let Some(max) = filter.max_targets {
        if out.len() > max as usize {
            return Err(PlanError::TooManyTargets {
                found: out.len(),
                max,
            });
        }
    }
    Ok(out)
}

/// The vendors among the selected phones (BulkPhoneChange assigns a model only to one vendor).
pub fn vendors(phones: &[SelectedPhone]) -> BTreeSet<String> {
    phones.iter().filter_map(|p| p.vendor.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
