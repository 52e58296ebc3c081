//! The console's static files, built into the binary: the page, its script and style, and the
//! vendored front-end stack (Preact and htm as ES modules, `ui/vendor/README.md` says which
//! versions and where from). They hold no data, so they need no token; nothing is fetched from
//! anywhere else at run time, and the page's Content-Security-Policy says so.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// One file: where it is served under `/ui/`, its content type and its bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const JS: &str = "text/javascript; charset=utf-8";

const INDEX: Asset = Asset {
    path: "index.html",
    content_type: "text/html; charset=utf-8",
    body: include_str!("ui/index.html"),
};

static FILES: [Asset; 7] = [
    INDEX,
    Asset { path: "app.js", content_type: JS, body: include_str!("ui/app.js") },
    Asset { path: "dag.js", content_type: JS, body: include_str!("ui/dag.js") },
    Asset {
        path: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("ui/style.css"),
    },
    Asset {
        path: "favicon.svg",
        content_type: "image/svg+xml",
        body: include_str!("ui/favicon.svg"),
    },
    Asset {
        path: "vendor/preact.mjs",
        content_type: JS,
        body: include_str!("ui/vendor/preact.mjs"),
    },
    Asset { path: "vendor/htm.mjs", content_type: JS, body: include_str!("ui/vendor/htm.mjs") },
];

/// Scripts, styles and connections from this origin only; no frames, no plugins, no forms that
/// post anywhere.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

fn serve(asset: &'static Asset) -> Response {
    let mut response = asset.body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    // Revalidated on every load, so a new binary's page is never mixed with an old script.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers
        .insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    response
}

/// `/ui`, `/ui/` (the page) and `/ui/FILE` for each file.
pub(super) fn routes() -> Router {
    let index = || async { serve(&INDEX) };
    let mut router = Router::new().route("/ui", get(index)).route("/ui/", get(index));
    for asset in &FILES {
        router =
            router.route(&format!("/ui/{}", asset.path), get(move || async move { serve(asset) }));
    }
    router
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_files_served_here() {
        for asset in &FILES {
            assert!(!asset.body.is_empty(), "{} is empty", asset.path);
            // No CDN, no other origin: every import and link is relative to /ui/.
            assert!(!asset.body.contains("https://cdn"), "{} names a CDN", asset.path);
        }
        for name in ["/ui/app.js", "/ui/style.css", "/ui/favicon.svg"] {
            assert!(INDEX.body.contains(name), "index.html does not load {name}");
        }
        let app = FILES.iter().find(|a| a.path == "app.js").map_or("", |a| a.body);
        for import in ["./vendor/preact.mjs", "./vendor/htm.mjs", "./dag.js"] {
            assert!(app.contains(import), "app.js does not import {import}");
        }
    }
}
