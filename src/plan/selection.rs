//! Target selection: the union of group members and listed extensions, minus exclusions.

use std::collections::BTreeSet;

use super::PlanError;

/// The selection as written in a spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub groups: Vec<String>,
    pub extensions: Vec<String>,
    pub exclude: Vec<String>,
    pub max_targets: Option<u32>,
}

/// Resolves which of the `found` extensions (already the union of groups and extensions, as the
/// PBX returned them) are targets: sorted, de-duplicated, excluded ones removed, and refused as a
/// whole when there are more than `max_targets`.
pub fn resolve<'a>(
    selector: &Selector,
    found: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<String>, PlanError> {
    let exclude: BTreeSet<&str> = selector.exclude.iter().map(String::as_str).collect();
    let targets: BTreeSet<&str> = found.into_iter().filter(|e| !exclude.contains(e)).collect();
    if let Some(max) = selector.max_targets {
        if targets.len() > max as usize {
            return Err(PlanError::TooManyTargets {
                found: targets.len(),
                max,
            });
        }
    }
    Ok(targets.into_iter().map(str::to_string).collect())
}

/// [`resolve`] of extensions the caller owns, in place (a 100,000-user selection is not copied),
/// in extension order.
pub fn resolve_owned(
    selector: &Selector,
    mut found: Vec<String>,
) -> Result<Vec<String>, PlanError> {
    let exclude: BTreeSet<&str> = selector.exclude.iter().map(String::as_str).collect();
    found.retain(|e| !exclude.contains(e.as_str()));
    found.sort_by(|a, b| crate::pbx::extension_order(a, b));
    found.dedup();
    if let Some(max) = selector.max_targets {
        if found.len() > max as usize {
            return Err(PlanError::TooManyTargets {
                found: found.len(),
                max,
            });
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(exclude: &[&str], max: Option<u32>) -> Selector {
        Selector {
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            max_targets: max,
            ..Default::default()
        }
    }

    #[test]
    fn union_minus_exclude_sorted_and_unique() {
        let found = ["203", "201", "202", "201"];
        assert_eq!(
            resolve(&sel(&["202"], None), found).unwrap(),
            ["201", "203"]
        );
    }

    #[test]
    fn max_targets_refuses_the_whole_selection() {
        let found = ["201", "202", "203"];
        let err = resolve(&sel(&[], Some(2)), found).unwrap_err();
        assert_eq!(err, PlanError::TooManyTargets { found: 3, max: 2 });
        assert!(err.to_string().contains("Verify your selection"));
        // Exclusions count before the limit.
        assert_eq!(resolve(&sel(&["203"], Some(2)), found).unwrap().len(), 2);
    }

    #[test]
    fn owned_resolution_is_the_same_in_extension_order() {
        let found = ["1000", "203", "201", "202", "201"];
        for selector in [
            sel(&["202"], None),
            sel(&[], Some(2)),
            sel(&["203"], Some(3)),
        ] {
            let borrowed = resolve(&selector, found).map(|mut v| {
                v.sort_by(|a, b| crate::pbx::extension_order(a, b));
                v
            });
            let owned = resolve_owned(&selector, found.map(String::from).to_vec());
            assert_eq!(owned, borrowed);
        }
        assert_eq!(
            resolve_owned(&sel(&[], None), found.map(String::from).to_vec()).unwrap(),
            ["201", "202", "203", "1000"]
        );
    }

    #[test]
    fn numeric_order() {
        let mut v = vec!["1000", "201", "99", "abc"];
        v.sort_by(|a, b| crate::pbx::extension_order(a, b));
        assert_eq!(v, ["99", "201", "1000", "abc"]);
    }
}
