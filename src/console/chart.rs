//! The chart of the Failures page (docs/console.md, "The pages"):
//! messages parked per hour over 7 days, stacked by kind, drawn on the
//! server as SVG with maud. No script and no inline style: colours
//! come from the style sheet by class, so the CSP stays `'self'`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, TimeDelta, Utc};
use maud::{Markup, html};
use serde_json::json;

use super::Console;
use super::frame::short;
use super::params::group_link;
use crate::parking::Filter;
use crate::parking::stats::{self, Grown, HOURS, Hour};

/// Groups listed as grown in the last hour.
const GROWN_SHOWN: i64 = 20;

/// The series and the grown groups, as of now.
async fn series(console: &Console) -> Result<(DateTime<Utc>, Vec<Hour>, Vec<Grown>), sqlx::Error> {
    let now = Utc::now();
    let first = stats::first_hour(now);
    let (hours, grown) = tokio::try_join!(
        stats::per_hour(&console.pool, &console.queue, first),
        stats::grown(&console.pool, &console.queue, now - TimeDelta::hours(1), GROWN_SHOWN),
    )?;
    Ok((first, hours, grown))
}

/// The top of the Failures page: the chart, and the groups that grew in
/// the last hour beside it.
///
/// # Errors
/// The database error.
pub async fn over_time(console: &Console) -> Result<Markup, sqlx::Error> {
    let (first, hours, grown) = series(console).await?;
    Ok(html! {
        section.over-time {
            (chart(&hours, first))
            aside #grown {
                h2 { "Grew in the last hour" }
                @if grown.is_empty() { p.note { "No message parked in the last hour." } }
                ul {
                    @for g in &grown {
                        li { a href=(group_link(&g.fingerprint, &Filter::default())) { code { (short(&g.fingerprint, 12)) } }
                            " " (g.error_kind) ": +" span.added { (g.added) } }
                    }
                }
            }
        }
    })
}

/// `GET /api/stats`: the chart's series (hours with parkings, by kind)
/// and the groups that grew in the last hour.
pub async fn api(State(console): State<Arc<Console>>) -> Response {
    match series(&console).await {
        Ok((first, hours, grown)) => Json(json!({
            "queue": console.queue,
            "from": first,
            "hours": hours,
            "grown_last_hour": grown,
        }))
        .into_response(),
        Err(e) => super::frame::problem(axum::http::StatusCode::SERVICE_UNAVAILABLE, format!("PostgreSQL: {e}")),
    }
}

/// Width of one hour's slot, in SVG units.
const SLOT: i64 = 5;
/// Left margin (the count labels).
const LEFT: i64 = 40;
/// Height of the tallest bar.
const TALL: f64 = 120.0;
/// Top of the plot.
const TOP: f64 = 10.0;

/// A class for `kind`'s colour: letters, digits and `_` only.
fn kind_class(kind: &str) -> String {
    let safe: String = kind
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    format!("k-{safe}")
}

/// The chart: one `g.bar` per hour that had parkings (`data-hour`,
/// `data-count`), a `rect` per kind inside it, stacked.
pub fn chart(hours: &[Hour], first: DateTime<Utc>) -> Markup {
    let max = hours.iter().map(|h| h.total).max().unwrap_or(0).max(1);
    let width = LEFT + HOURS * SLOT + 10;
    let base = TOP + TALL;
    let kinds: std::collections::BTreeSet<&str> =
        hours.iter().flat_map(|h| h.kinds.keys()).map(String::as_str).collect();
    html! {
        figure #chart {
            svg #failures-chart xmlns="http://www.w3.org/2000/svg" viewBox=(format!("0 0 {width} {}", base + 25.0))
                role="img" aria-labelledby="chart-title" {
                title #chart-title { "Messages parked per hour, last 7 days, by kind (most in one hour: " (max) ")" }
                line.axis x1=(LEFT) y1=(base) x2=(width - 10) y2=(base) {}
                text.label x="2" y=(TOP + 8.0) { (max) }
                text.label x="2" y=(base) { "0" }
                @for day in 0..7 {
                    @let x = LEFT + day * 24 * SLOT;
                    line.tick x1=(x) y1=(base) x2=(x) y2=(base + 4.0) {}
                    text.label x=(x) y=(base + 16.0) { ((first + TimeDelta::days(day)).format("%a %d")) }
                }
                @for hour in hours { (bar(hour, first, max, base)) }
            }
            figcaption {
                "Messages parked per hour over the last 7 days (UTC), by kind: "
                @for kind in &kinds { span class=(format!("swatch {}", kind_class(kind))) { (kind) } " " }
            }
        }
    }
}

fn bar(hour: &Hour, first: DateTime<Utc>, max: i64, base: f64) -> Markup {
    let slot = (hour.hour - first).num_hours().clamp(0, HOURS - 1);
    let x = LEFT + slot * SLOT;
    let scale = TALL / max as f64;
    // Each kind's segment sits on the one before it.
    let mut top = base;
    let segments: Vec<(String, f64, f64)> = hour
        .kinds
        .iter()
        .map(|(kind, n)| {
            let height = (*n as f64 * scale).max(1.0);
            top -= height;
            (kind_class(kind), top, height)
        })
        .collect();
    html! {
        g.bar data-hour=(hour.hour.to_rfc3339()) data-count=(hour.total) {
            title { (hour.hour.format("%Y-%m-%d %H:00 UTC")) ": " (hour.total) " parked"
                @for (kind, n) in &hour.kinds { ", " (kind) " " (n) } }
            @for (class, y, height) in &segments {
                rect class=(class) x=(x) y=(format!("{y:.1}")) width=(SLOT - 1) height=(format!("{height:.1}")) {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn one_bar_per_hour_with_failures_and_kinds_as_classes() {
        let first = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let hour = |h: i64, kinds: &[(&str, i64)]| Hour {
            hour: first + TimeDelta::hours(h),
            total: kinds.iter().map(|k| k.1).sum(),
            kinds: kinds
                .iter()
                .map(|(k, n)| ((*k).to_owned(), *n))
                .collect::<BTreeMap<_, _>>(),
        };
        let svg = chart(
            &[hour(3, &[("validation", 2), ("decode", 1)]), hour(40, &[("<x>", 1)])],
            first,
        )
        .into_string();
        assert_eq!(svg.matches("<g class=\"bar\"").count(), 2);
        assert!(svg.contains("data-count=\"3\""));
        assert!(svg.contains("class=\"k-x\""), "a kind is a safe class: {svg}");
        assert!(!svg.contains("<x>") && !svg.contains("style="));
    }
}
