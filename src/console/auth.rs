//! Who asks, and what they may do (docs/console.md, "Security").
//!
//! * With `CONSOLE_TOKEN`, every page asks for a token at `/login`: the
//!   operator token may act, the viewer token (`CONSOLE_VIEWER_TOKEN`) may
//!   only read. A token given at login becomes a session: a random id in
//!   an HttpOnly, SameSite=Strict cookie, kept in memory for
//!   [`SESSION_LIFETIME`]. Scripts send `Authorization: Bearer <token>`
//!   instead.
//! * Without a token the console listens on loopback only, whoever reaches
//!   it is the operator `local`, and a request must name a loopback host
//!   (so a page that rebinds its own name to 127.0.0.1 is refused).
//! * Every POST must come from the console's own origin (`Origin`, or
//!   `Referer`) and carry the session's CSRF token (the `csrf` form field
//!   or the `X-CSRF-Token` header); a bearer token needs neither, since a
//!   browser never sends one by itself.
//! * Every response carries a strict Content-Security-Policy (`'self'`
//!   only, no inline script or style) and forbids framing and sniffing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use sha2::{Digest, Sha256};

use super::layout::layout_bare;
use super::params::Params;
use super::{Console, settings::Token};

/// The session cookie's name.
pub const COOKIE: &str = "wic_console";
/// How long a login lasts.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; the oldest goes first.
const MAX_SESSIONS: usize = 10_000;
/// How long a wrong token waits for its answer (slows guessing).
const WRONG_TOKEN_DELAY: Duration = Duration::from_millis(300);

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; \
                   object-src 'none'";

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Operator,
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }
}

/// Who asks: put into each request by [`guard`].
#[derive(Debug, Clone)]
pub struct Who {
    pub role: Role,
    /// The name given at login (`local` without a token, `api` for a
    /// bearer token).
    pub name: String,
    /// The session's CSRF token (`None` for a bearer token).
    pub csrf: Option<String>,
}

impl Who {
    /// The actor written to `operator_actions`: role and name.
    pub fn actor(&self) -> String {
        format!("{}:{}", self.role.as_str(), self.name)
    }

    pub fn may_act(&self) -> bool {
        self.role == Role::Operator
    }
}

struct Session {
    who: Who,
    expires: Instant,
}

/// The logged-in sessions, in memory (a restart logs everyone out).
#[derive(Default)]
pub struct Sessions(Mutex<HashMap<String, Session>>);

impl Sessions {
    fn start(&self, role: Role, name: &str) -> (String, Who) {
        let id = random_hex();
        let who = Who {
            role,
            name: name.to_owned(),
            csrf: Some(random_hex()),
        };
        let now = Instant::now();
        let mut sessions = self.0.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            id.clone(),
            Session {
                who: who.clone(),
                expires: now + SESSION_LIFETIME,
            },
        );
        (id, who)
    }

    fn get(&self, id: &str) -> Option<Who> {
        let sessions = self.0.lock().unwrap_or_else(|e| e.into_inner());
        sessions
            .get(id)
            .filter(|s| s.expires > Instant::now())
            .map(|s| s.who.clone())
    }

    fn end(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

/// 32 random bytes from the operating system, in hex.
fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    // Without the OS generator nothing here can be trusted: stop.
    getrandom::fill(&mut bytes).expect("the operating system's random generator");
    hex::encode(bytes)
}

/// Compares two secrets in a time that does not depend on where they
/// differ.
fn same_secret(given: &str, expected: &str) -> bool {
    let (a, b) = (Sha256::digest(given.as_bytes()), Sha256::digest(expected.as_bytes()));
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn is_token(given: &str, token: Option<&Token>) -> bool {
    token.is_some_and(|t| same_secret(given, t.expose()))
}

/// The role a token gives, if any.
fn role_of(console: &Console, token: &str) -> Option<Role> {
    let settings = &console.settings;
    if is_token(token, settings.token.as_ref()) {
        Some(Role::Operator)
    } else if is_token(token, settings.viewer_token.as_ref()) {
        Some(Role::Viewer)
    } else {
        None
    }
}

fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(k, v)| (k == name).then_some(v))
}

fn session_cookie(id: &str, max_age: Duration) -> HeaderValue {
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        max_age.as_secs()
    );
    HeaderValue::from_str(&cookie).expect("hex id and fixed attributes")
}

/// Whether the request names a loopback host (no token: DNS rebinding).
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    };
    matches!(name, "localhost" | "[::1]") || name.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether a POST comes from a page of this console: `Origin` (or, when a
/// browser sent none, `Referer`) names the same scheme-less host as
/// `Host`, and `Sec-Fetch-Site`, when sent, says `same-origin`.
fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name| headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let Some(host) = text(header::HOST) else { return false };
    if text(HeaderName::from_static("sec-fetch-site")).is_some_and(|site| site != "same-origin") {
        return false;
    }
    let from = text(header::ORIGIN).or_else(|| text(header::REFERER));
    from.and_then(|from| url::Url::parse(from).ok()).is_some_and(|url| {
        let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
        matches!(url.scheme(), "http" | "https") && format!("{}{port}", url.host_str().unwrap_or("")) == host
    })
}

/// Whether `given` is the session's CSRF token.
pub fn csrf_ok(who: &Who, given: Option<&str>) -> bool {
    match (&who.csrf, given) {
        (None, _) => true,
        (Some(expected), Some(given)) => same_secret(given, expected),
        (Some(_), None) => false,
    }
}

/// Finds who asks and stops what they may not do; see the module's
/// documentation.
pub async fn guard(State(console): State<Arc<Console>>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let api = path.starts_with("/api/");
    let headers = request.headers();
    if !console.settings.protected() && !loopback_host(headers) {
        let why = "without CONSOLE_TOKEN the console answers loopback names only";
        return refuse(api, StatusCode::FORBIDDEN, why);
    }
    let Ok((who, new_cookie)) = identify(&console, headers, api) else {
        return refuse(api, StatusCode::UNAUTHORIZED, "wrong token");
    };
    if request.method() == Method::POST
        && let Some(why) = post_refusal(headers, who.as_ref(), &path)
    {
        return refuse(api, StatusCode::FORBIDDEN, why);
    }
    let response = match who {
        Some(who) => {
            request.extensions_mut().insert(who);
            next.run(request).await
        }
        None if path == "/login" || path.starts_with("/static/") => next.run(request).await,
        None if api => return refuse(true, StatusCode::UNAUTHORIZED, "log in or send Authorization: Bearer"),
        None => {
            let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
            return Redirect::to(&format!("/login?next={}", Params::encode(target))).into_response();
        }
    };
    with_cookie(response, new_cookie.as_deref(), SESSION_LIFETIME)
}

/// Who asks: a bearer token's role, a session's person, or (without
/// `CONSOLE_TOKEN`) the operator `local`, with a new session for a
/// browser (its cookie id returned) and none for a script of the API.
fn identify(console: &Console, headers: &HeaderMap, api: bool) -> Result<(Option<Who>, Option<String>), WrongToken> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(token) = bearer {
        let role = role_of(console, token.trim()).ok_or(WrongToken)?;
        return Ok((Some(Who::script(role)), None));
    }
    if let Some(who) = cookie_value(headers, COOKIE).and_then(|id| console.sessions.get(id)) {
        return Ok((Some(who), None));
    }
    if console.settings.protected() {
        return Ok((None, None));
    }
    if api {
        return Ok((Some(Who::script(Role::Operator)), None));
    }
    let (id, who) = console.sessions.start(Role::Operator, "local");
    Ok((Some(who), Some(id)))
}

/// A bearer token that is neither token.
struct WrongToken;

impl Who {
    /// A script: no session, so no CSRF token (a browser never sends a
    /// bearer token by itself, nor, cross-site, a JSON body).
    fn script(role: Role) -> Who {
        Who {
            role,
            name: "api".into(),
            csrf: None,
        }
    }
}

/// Why a POST is refused, if it is: another origin named; a browser's
/// (a session's, or a login's) without proof of coming from our pages; a
/// viewer's.
fn post_refusal(headers: &HeaderMap, who: Option<&Who>, path: &str) -> Option<&'static str> {
    let origin_named = headers.contains_key(header::ORIGIN);
    let browser = who.is_none_or(|w| w.csrf.is_some());
    if (origin_named || browser) && !same_origin(headers) {
        return Some("a POST must come from the console's own pages");
    }
    if who.is_some_and(|w| !w.may_act()) && path != "/logout" {
        return Some("the viewer token may only read");
    }
    None
}

fn with_cookie(mut response: Response, id: Option<&str>, max_age: Duration) -> Response {
    if let Some(id) = id {
        response
            .headers_mut()
            .append(header::SET_COOKIE, session_cookie(id, max_age));
    }
    response
}

fn refuse(api: bool, status: StatusCode, why: &str) -> Response {
    if api {
        (status, axum::Json(serde_json::json!({ "error": why }))).into_response()
    } else {
        (status, layout_bare("Refused", html! { p.error { (why) } })).into_response()
    }
}

/// The headers every response carries.
pub async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let fixed = [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "same-origin"),
    ];
    for (name, value) in fixed {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// Where to go after login: a path of this console only.
fn next_path(params: &Params) -> String {
    params
        .get("next")
        .filter(|n| n.starts_with('/') && !n.starts_with("//") && !n.contains('\\'))
        .unwrap_or("/")
        .to_owned()
}

/// `GET /login`.
pub async fn login_page(State(console): State<Arc<Console>>, params: Params) -> Response {
    if !console.settings.protected() {
        return Redirect::to("/").into_response();
    }
    login_form(&next_path(&params), None).into_response()
}

fn login_form(next: &str, problem: Option<&str>) -> Markup {
    layout_bare(
        "Log in",
        html! {
            h1 { "Log in" }
            @if let Some(problem) = problem { p.error role="alert" { (problem) } }
            form method="post" action="/login" {
                input type="hidden" name="next" value=(next);
                label { "Your name " input type="text" name="name" required maxlength="64" autocomplete="username"; }
                label { "Token " input type="password" name="token" required autocomplete="current-password"; }
                button type="submit" { "Log in" }
            }
        },
    )
}

/// `POST /login`: a right token starts a session.
pub async fn login(State(console): State<Arc<Console>>, body: axum::body::Bytes) -> Response {
    let params = Params::from_form(&body);
    let next = next_path(&params);
    let name: String = params
        .get("name")
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect();
    let name = name.trim();
    let role = params.get("token").and_then(|token| role_of(&console, token));
    match role {
        Some(role) if !name.is_empty() => {
            let (id, _) = console.sessions.start(role, name);
            with_cookie(Redirect::to(&next).into_response(), Some(&id), SESSION_LIFETIME)
        }
        Some(_) => (
            StatusCode::BAD_REQUEST,
            login_form(&next, Some("Give your name: actions are logged with it.")),
        )
            .into_response(),
        None => {
            tokio::time::sleep(WRONG_TOKEN_DELAY).await;
            (StatusCode::UNAUTHORIZED, login_form(&next, Some("Wrong token."))).into_response()
        }
    }
}

/// `POST /logout`.
pub async fn logout(
    State(console): State<Arc<Console>>,
    axum::Extension(who): axum::Extension<Who>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !csrf_ok(&who, Params::from_form(&body).get("csrf")) {
        return refuse(false, StatusCode::FORBIDDEN, "missing or wrong CSRF token");
    }
    if let Some(id) = cookie_value(&headers, COOKIE) {
        console.sessions.end(id);
    }
    let target = if console.settings.protected() { "/login" } else { "/" };
    let mut response = Redirect::to(target).into_response();
    response
        .headers_mut()
        .append(header::SET_COOKIE, session_cookie("", Duration::ZERO));
    response
}

/// Refuses a POST whose CSRF token is missing or wrong.
pub fn csrf_refusal(api: bool) -> Response {
    refuse(api, StatusCode::FORBIDDEN, "missing or wrong CSRF token")
}
