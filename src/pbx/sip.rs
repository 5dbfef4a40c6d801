//! SIP details that are PBX-independent: vendors from User-Agents, the NOTIFY event each vendor
//! honours, and the checks that keep untrusted values out of SIP headers.

/// The vendor a User-Agent header names, e.g. `Yealink SIP-T46S 66.86.0.15` -> Yealink.
pub fn vendor_from_user_agent(user_agent: &str) -> Option<&'static str> {
    const VENDORS: [(&str, &str); 9] = [
        ("yealink", "Yealink"),
        ("poly", "Poly"),
        ("polycom", "Poly"),
        ("snom", "Snom"),
        ("grandstream", "Grandstream"),
        ("cisco", "Cisco"),
        ("fanvil", "Fanvil"),
        ("gigaset", "Gigaset"),
        ("linksys", "Cisco"),
    ];
    let ua = user_agent.to_ascii_lowercase();
    VENDORS
        .iter()
        .find(|(needle, _)| ua.contains(needle))
        .map(|(_, vendor)| *vendor)
}

/// The model a User-Agent names, where vendors put it second (`Yealink SIP-T46S 66.86.0.15`).
pub fn model_from_user_agent(user_agent: &str) -> Option<String> {
    let mut words = user_agent.split_whitespace();
    let first = words.next()?;
    vendor_from_user_agent(first)?;
    let model = words.next()?;
    let model = model.trim_end_matches(['/', ',', ';']);
    let model = model.split('/').next().unwrap_or(model);
    (!model.is_empty()).then(|| model.to_string())
}

/// The `Event` header value that makes a phone of this vendor resync or reboot.
/// Most vendors honour `check-sync`; Cisco SPA/MPP firmware expects `resync` / `reboot_now`.
pub fn notify_event(vendor: Option<&str>, reboot: bool) -> &'static str {
    match (vendor, reboot) {
        (Some("Cisco"), true) => "reboot_now",
        (Some("Cisco"), false) => "resync",
        (_, true) => "check-sync;reboot=true",
        (_, false) => "check-sync",
    }
}

/// Refuses a value that could break out of a SIP header or URI (CR, LF, NUL, other controls).
pub fn header_safe(value: &str) -> bool {
    !value.chars().any(|c| c.is_control())
}

/// A SIP or SIPS URI as a contact may hold it, without anything that could inject headers.
pub fn is_sip_uri(uri: &str) -> bool {
    (uri.starts_with("sip:") || uri.starts_with("sips:"))
        && uri.len() <= 512
        && header_safe(uri)
        && !uri.contains(['<', '>', '"', ' '])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendors_and_models_from_user_agents() {
        let cases = [
            (
                "Yealink SIP-T46S 66.86.0.15",
                Some("Yealink"),
                Some("SIP-T46S"),
            ),
            ("PolycomVVX-VVX_450-UA/6.4.3.5018", Some("Poly"), None),
            ("Poly VVX450 6.4.3", Some("Poly"), Some("VVX450")),
            ("snom D785/10.1.84.12", Some("Snom"), Some("D785")),
            ("Snom D785 10.1.84.12", Some("Snom"), Some("D785")),
            (
                "Grandstream GRP2614 1.0.5.33",
                Some("Grandstream"),
                Some("GRP2614"),
            ),
            ("Cisco/SPA504G-7.6.2", Some("Cisco"), None),
            ("Cisco CP-8841 12.0", Some("Cisco"), Some("CP-8841")),
            ("Linphone/5.0", None, None),
            ("", None, None),
        ];
        for (ua, vendor, model) in cases {
            assert_eq!(vendor_from_user_agent(ua), vendor, "{ua}");
            assert_eq!(model_from_user_agent(ua).as_deref(), model, "{ua}");
        }
    }

    #[test]
    fn cisco_gets_its_own_events() {
        assert_eq!(
            notify_event(Some("Yealink"), true),
            "check-sync;reboot=true"
        );
        assert_eq!(notify_event(None, false), "check-sync");
        assert_eq!(notify_event(Some("Cisco"), true), "reboot_now");
        assert_eq!(notify_event(Some("Cisco"), false), "resync");
    }

    #[test]
    fn header_injection_is_refused() {
        assert!(is_sip_uri("sip:201@127.0.0.1:5070;transport=udp"));
        assert!(!is_sip_uri("sip:201@h\r\nX-Evil: 1"));
        assert!(!is_sip_uri("tel:+15550100"));
        assert!(!is_sip_uri("sip:a@b>;x"));
        assert!(!header_safe("a\nb"));
        assert!(header_safe("Ana Díaz"));
    }
}
