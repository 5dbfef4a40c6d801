//! Names for scheduled PhoneRestarts: derived from the scheduled time, so a CronJob that fires
//! twice for the same time creates one PhoneRestart, not two.

use jiff::{Timestamp, Zoned, tz::TimeZone};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("{0:?} is not a cron schedule (e.g. \"0 2 * * *\"): {1}")]
    BadSchedule(String, String),
    #[error("no time matching {0:?} before now")]
    NoOccurrence(String),
}

/// The scheduled time a run at `now` belongs to: the latest time of `schedule` (UTC) at or
/// before `now`, or `now` to the minute without a schedule.
pub fn scheduled_time(schedule: Option<&str>, now: Timestamp) -> Result<Timestamp, ScheduleError> {
    let minute =
        Timestamp::from_second(now.as_second() - now.as_second().rem_euclid(60)).expect("in range");
    let Some(schedule) = schedule else {
        return Ok(minute);
    };
    let cron = croner::parser::CronParser::new()
        .parse(schedule)
        .map_err(|e| ScheduleError::BadSchedule(schedule.to_string(), e.to_string()))?;
    let zoned = Zoned::new(now, TimeZone::UTC);
    let previous = cron
        .find_previous_occurrence(&zoned, true)
        .map_err(|_| ScheduleError::NoOccurrence(schedule.to_string()))?;
    Ok(previous.timestamp())
}

/// `<base>-<YYYYMMDD>-<HHMM>` in UTC, cut so the whole stays a valid object name.
pub fn restart_name(base: &str, at: Timestamp) -> String {
    let stamp = at
        .to_zoned(TimeZone::UTC)
        .strftime("%Y%m%d-%H%M")
        .to_string();
    let base: String = base.chars().take(253 - stamp.len() - 1).collect();
    format!("{}-{stamp}", base.trim_end_matches('-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn two_fires_for_one_schedule_get_one_name() {
        let first = scheduled_time(Some("0 2 * * *"), t("2026-11-22T02:00:03Z")).unwrap();
        let late = scheduled_time(Some("0 2 * * *"), t("2026-11-22T02:07:40Z")).unwrap();
        assert_eq!(first, t("2026-11-22T02:00:00Z"));
        assert_eq!(
            first, late,
            "a late or repeated fire maps to the same scheduled time"
        );
        assert_eq!(restart_name("nightly", first), "nightly-20261122-0200");
        let next_day = scheduled_time(Some("0 2 * * *"), t("2026-11-23T02:00:01Z")).unwrap();
        assert_ne!(
            restart_name("nightly", next_day),
            restart_name("nightly", first)
        );
    }

    #[test]
    fn without_a_schedule_the_minute_counts() {
        let a = scheduled_time(None, t("2026-11-22T02:00:03Z")).unwrap();
        let b = scheduled_time(None, t("2026-11-22T02:00:59Z")).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_schedules_say_so() {
        let err = scheduled_time(Some("every night"), t("2026-11-22T02:00:03Z")).unwrap_err();
        assert!(err.to_string().contains("not a cron schedule"), "{err}");
    }

    #[test]
    fn long_bases_are_cut() {
        let name = restart_name(&"x".repeat(300), t("2026-11-22T02:00:00Z"));
        assert!(name.len() <= 253 && name.ends_with("-20261122-0200"));
    }
}
