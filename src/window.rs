//! The maintenance window of a service (`upgrade_window`): the hours of local time, on some days or every
//! day, in which automatic upgrades (a watched release, a recycle) may run.
//!
//! A window is plain data ([`Window`]); [`Window::at`] says, at a moment of local time, whether it is open
//! and when that changes. Local time is the system's (`TZ`, else `/etc/localtime`), through `jiff`, so a
//! daylight-saving change moves the window with the clocks. Nothing here reads the clock: the caller passes
//! the moment.

use std::fmt;

use jiff::ZonedDateTime;
use jiff::civil::{Time, Weekday};

/// Days of the week by their names, Monday first.
const DAYS: [(&str, Weekday); 7] = [
    ("mon", Weekday::Monday),
    ("tue", Weekday::Tuesday),
    ("wed", Weekday::Wednesday),
    ("thu", Weekday::Thursday),
    ("fri", Weekday::Friday),
    ("sat", Weekday::Saturday),
    ("sun", Weekday::Sunday),
];

/// Hours of local time, on some days of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The days it opens on, Monday first (a window past midnight closes the next day).
    days: [bool; 7],
    /// When it opens, in seconds after midnight.
    start: u32,
    /// When it closes, in seconds after midnight; before `start`, the next day.
    end: u32,
}

/// A window as seen at a moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Whether it is open.
    pub open: bool,
    /// When it closes (if open) or opens (if closed).
    pub changes: ZonedDateTime,
}

impl Window {
    /// Parses `"02:00-04:00"`, `"Sat,Sun 01:00-05:00"` or `"Mon-Fri 22:00-02:30:00"`: days (names,
    /// ranges, commas; every day when left out), then `HH:MM[:SS]-HH:MM[:SS]` in local time, the end
    /// `24:00` at most, and before the start for a window past midnight.
    pub fn parse(text: &str) -> Result<Window, String> {
        let text = text.trim();
        let (days_text, hours) = match text.rsplit_once(' ') {
            Some((days, hours)) => (Some(days.trim()), hours),
            None => (None, text),
        };
        let days = match days_text {
            None => [true; 7],
            Some(days) => parse_days(days)?,
        };
        let (start, end) = hours
            .split_once('-')
            .ok_or_else(|| format!("`{hours}` is not a span of hours like \"02:00-04:00\""))?;
        let (start, end) = (seconds(start, false)?, seconds(end, true)?);
        if start == end || (start == 0 && end == 24 * 3600) && days == [true; 7] {
            return Err(format!(
                "`{hours}` is always open or never: leave upgrade_window out instead"
            ));
        }
        Ok(Window { days, start, end })
    }

    /// Whether the window is open at `now`, and when that next changes.
    pub fn at(&self, now: &ZonedDateTime) -> Seen {
        let tz = now.time_zone();
        let today = now.date();
        let mut next_start: Option<ZonedDateTime> = None;
        // A window that opened yesterday may still be open; the next start is within a week.
        for offset in -1i32..=7 {
            let Ok(day) = today.checked_add(jiff::Span::new().days(offset)) else {
                continue;
            };
            if !self.days[day.weekday().to_monday_zero_offset() as usize] {
                continue;
            }
            let closes_on = if self.end <= self.start {
                day.tomorrow().unwrap_or(day)
            } else {
                day
            };
            let (Ok(opens), Ok(closes)) = (
                day.to_datetime(time_of(self.start)).to_zoned_datetime(tz.clone()),
                at_seconds(closes_on, self.end).to_zoned_datetime(tz.clone()),
            ) else {
                continue;
            };
            if opens <= *now && *now < closes {
                return Seen {
                    open: true,
                    changes: closes,
                };
            }
            if opens > *now && next_start.as_ref().is_none_or(|n| opens < *n) {
                next_start = Some(opens);
            }
        }
        Seen {
            open: false,
            // Some day of the week is always in the window; a week on is the bound.
            changes: next_start.unwrap_or_else(|| now.checked_add(jiff::Span::new().days(7)).unwrap_or(now.clone())),
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.days != [true; 7] {
            let names: Vec<&str> = DAYS
                .iter()
                .zip(self.days)
                .filter(|(_, on)| *on)
                .map(|((name, _), _)| *name)
                .collect();
            write!(f, "{} ", names.join(","))?;
        }
        let hms = |s: u32| format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
        write!(f, "{}-{}", hms(self.start), hms(self.end))
    }
}

fn parse_days(text: &str) -> Result<[bool; 7], String> {
    let index = |name: &str| {
        let lower = name.trim().to_ascii_lowercase();
        DAYS.iter().position(|(day, _)| lower == *day).ok_or_else(|| {
            format!(
                "`{}` is not a day: use Mon, Tue, Wed, Thu, Fri, Sat or Sun",
                name.trim()
            )
        })
    };
    let mut days = [false; 7];
    for part in text.split(',') {
        match part.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (index(from)?, index(to)?);
                let mut day = from;
                loop {
                    days[day] = true;
                    if day == to {
                        break;
                    }
                    day = (day + 1) % 7;
                }
            }
            None => days[index(part)?] = true,
        }
    }
    Ok(days)
}

/// `HH:MM[:SS]` as seconds after midnight; `24:00` only as an end.
fn seconds(text: &str, end: bool) -> Result<u32, String> {
    let parts: Vec<&str> = text.trim().split(':').collect();
    let number = |part: &str| part.parse::<u32>().ok().filter(|_| part.len() == 2);
    let fields: Option<Vec<u32>> = parts.iter().map(|p| number(p)).collect();
    let bad = || format!("`{}` is not a time like \"02:00\" or \"02:00:30\"", text.trim());
    let fields = fields.filter(|f| f.len() == 2 || f.len() == 3).ok_or_else(bad)?;
    let (h, m, s) = (fields[0], fields[1], fields.get(2).copied().unwrap_or(0));
    if (h, m, s) == (24, 0, 0) && end {
        return Ok(24 * 3600);
    }
    if h > 23 || m > 59 || s > 59 {
        return Err(bad());
    }
    Ok(h * 3600 + m * 60 + s)
}

fn time_of(seconds: u32) -> Time {
    let s = seconds.min(24 * 3600 - 1);
    Time::new((s / 3600) as i8, (s / 60 % 60) as i8, (s % 60) as i8, 0).unwrap_or(Time::midnight())
}

/// The moment `seconds` after the midnight that starts `day` (24:00 is the next midnight).
fn at_seconds(day: jiff::civil::Date, seconds: u32) -> jiff::civil::DateTime {
    if seconds >= 24 * 3600 {
        return day.tomorrow().unwrap_or(day).to_datetime(Time::midnight());
    }
    day.to_datetime(time_of(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> ZonedDateTime {
        // 2026-12-05 is a Saturday.
        format!("{text}[UTC]").parse().expect("a zoned time")
    }

    #[test]
    fn a_daily_window_is_open_inside_and_says_when_it_opens_outside() {
        let window = Window::parse("02:00-04:00").expect("window");
        let seen = window.at(&at("2026-12-05T03:00:00"));
        assert!(seen.open);
        assert_eq!(seen.changes, at("2026-12-05T04:00:00"));
        let seen = window.at(&at("2026-12-05T05:00:00"));
        assert!(!seen.open);
        assert_eq!(seen.changes, at("2026-12-06T02:00:00"));
        let seen = window.at(&at("2026-12-05T01:59:59"));
        assert_eq!(seen.changes, at("2026-12-05T02:00:00"));
        assert!(!window.at(&at("2026-12-05T04:00:00")).open, "the end is not in it");
    }

    #[test]
    fn days_ranges_and_windows_past_midnight() {
        let weekend = Window::parse("Sat,Sun 01:00-05:00").expect("window");
        assert!(weekend.at(&at("2026-12-05T02:00:00")).open, "Saturday");
        let friday = weekend.at(&at("2026-12-04T02:00:00"));
        assert!(!friday.open);
        assert_eq!(friday.changes, at("2026-12-05T01:00:00"));
        // Sunday's window opens next after Saturday's closes.
        assert_eq!(
            weekend.at(&at("2026-12-05T06:00:00")).changes,
            at("2026-12-06T01:00:00")
        );
        // Monday after Sunday's: next Saturday.
        assert_eq!(
            weekend.at(&at("2026-12-07T06:00:00")).changes,
            at("2026-12-12T01:00:00")
        );

        let nights = Window::parse("mon-fri 22:00-02:30").expect("window");
        // Friday 23:00 and Saturday 01:00 are Friday night's window; Saturday 23:00 is not.
        assert!(nights.at(&at("2026-12-04T23:00:00")).open);
        let saturday_night = nights.at(&at("2026-12-05T01:00:00"));
        assert!(saturday_night.open);
        assert_eq!(saturday_night.changes, at("2026-12-05T02:30:00"));
        let saturday = nights.at(&at("2026-12-05T23:00:00"));
        assert!(!saturday.open);
        assert_eq!(saturday.changes, at("2026-12-07T22:00:00"), "Monday night");
        let wraps = Window::parse("Sat-Mon 00:00:30-24:00").expect("window");
        assert_eq!(wraps.to_string(), "mon,sat,sun 00:00:30-24:00:00");
        assert!(wraps.at(&at("2026-12-06T23:59:59")).open);
    }

    #[test]
    fn bad_windows_are_refused_with_a_reason() {
        for (text, expected) in [
            ("2-4", "not a time"),
            ("02:00", "not a span of hours"),
            ("25:00-26:00", "not a time"),
            ("02:00-02:00", "always open or never"),
            ("00:00-24:00", "always open or never"),
            ("Sat,Funday 01:00-02:00", "`Funday` is not a day"),
            ("02:00-24:30", "not a time"),
            ("24:00-02:00", "not a time"),
        ] {
            let error = Window::parse(text).expect_err(text);
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn the_window_follows_the_clocks_across_a_daylight_saving_change() {
        // Europe/Berlin springs forward on 2026-03-29 at 02:00 to 03:00: 01:00-04:00 is two hours long then.
        let window = Window::parse("01:00-04:00").expect("window");
        let now: ZonedDateTime = "2026-03-29T00:30:00+01:00[Europe/Berlin]".parse().expect("zoned");
        let seen = window.at(&now);
        assert!(!seen.open);
        assert_eq!(seen.changes.hour(), 1);
        let inside: ZonedDateTime = "2026-03-29T03:30:00+02:00[Europe/Berlin]".parse().expect("zoned");
        let seen = window.at(&inside);
        assert!(seen.open);
        assert_eq!(seen.changes.datetime(), "2026-03-29T04:00:00".parse().expect("civil"));
    }
}
