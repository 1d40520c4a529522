//! The fleet dashboard (`GET /ui`): one static page, its stylesheet and a
//! small dependency-free script, compiled into the binary. The page holds no
//! fleet data, so it is served without the operator token; its script asks
//! for the token (a login form, or `#token=` in the URL fragment, which never
//! reaches the server), keeps it in `sessionStorage`, and reads the operator
//! API with `Authorization: Bearer`. A strict Content-Security-Policy allows
//! only this origin's script and stylesheet (no inline code), and the script
//! puts every value into the page as text, never as markup.

use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The page shell.
pub const PAGE: &str = include_str!("ui/index.html");
/// The page's script.
pub const SCRIPT: &str = include_str!("ui/app.js");
/// The page's stylesheet.
pub const STYLE: &str = include_str!("ui/app.css");

/// Only this origin's files; no inline script or style, no framing, no
/// `<base>` or form posts elsewhere.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
form-action 'self'; frame-ancestors 'none'";

/// The dashboard's routes: `/ui` (and `/ui/`), `/ui/app.js`, `/ui/app.css`.
/// Mounted beside the operator API, outside its token check.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(page))
        .route("/ui/", get(page))
        .route("/ui/app.js", get(script))
        .route("/ui/app.css", get(style))
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers: [(HeaderName, HeaderValue); 6] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
    ];
    (headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page loads exactly the two files served beside it, and no inline
    /// script or style (the CSP would refuse them).
    #[test]
    fn the_page_loads_only_its_own_files() {
        assert_eq!(PAGE.matches("<script").count(), 1, "{PAGE}");
        assert!(PAGE.contains(r#"<script src="/ui/app.js" defer></script>"#));
        assert!(PAGE.contains(r#"<link rel="stylesheet" href="/ui/app.css">"#));
        assert!(!PAGE.contains("<style"), "no inline style");
        assert!(!PAGE.contains(" style="), "no inline style attribute");
        let handler = PAGE.split(" on").skip(1).find(|rest| {
            let name = rest.chars().take_while(char::is_ascii_alphabetic).count();
            name > 0 && rest[name..].starts_with('=')
        });
        assert!(handler.is_none(), "an inline event handler: on{handler:?}");
        assert!(!PAGE.contains("://"), "nothing fetched from elsewhere");
        assert!(!SCRIPT.contains("://"), "nothing fetched from elsewhere");
    }

    /// Values reach the page as text only: the script never parses markup.
    #[test]
    fn the_script_never_writes_markup() {
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
        ] {
            assert!(!SCRIPT.contains(sink), "app.js uses {sink}");
        }
    }
}
