//! The frame of every page: the document head (the style sheet and htmx,
//! both served by the console itself) around a page's body.

use maud::{DOCTYPE, Markup, html};

/// A page without the navigation (login, errors).
pub fn layout_bare(title: &str, body: Markup) -> Markup {
    document(title, None, body)
}

/// The document: head, an optional header, and `body` in `main`.
pub fn document(title: &str, header: Option<Markup>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                // No inline styles or eval: the CSP allows 'self' only.
                meta name="htmx-config" content=r#"{"includeIndicatorStyles":false,"allowEval":false,"allowScriptTags":false}"#;
                title { (title) " · worker-iot-core console" }
                link rel="stylesheet" href="/static/console.css";
                script src="/static/htmx.min.js" defer {}
            }
            body { @if let Some(header) = header { (header) } main { (body) } }
        }
    }
}
