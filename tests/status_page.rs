//! The status page at `/`: what it shows, that it shows nothing without the token, and how it
//! looks in a real browser (headless Chromium from Debian, which `.ci/run` installs).

mod image_support;
mod support;

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;
use support::{TIMEOUT, TOKEN, TestServer, Ws};

/// An image name that needs escaping in HTML (an alias of the host image).
const ODD_IMAGE: &str = "course<b>&\"x\"";

fn server(token: Option<&str>) -> TestServer {
    TestServer::start_with(|config| {
        config.server.token = token.map(str::to_owned);
        config
            .sandbox
            .images
            .insert(ODD_IMAGE.into(), "host".into());
    })
}

fn environment(server: &TestServer, id: u64, image: &str, pool: u32) {
    let body = json!({"image": image, "prewarmingPoolSize": pool, "cpuLimit": 20,
        "memoryLimit": 256, "networkAccess": false, "exposedPorts": []});
    let answer = server.send("PUT", &format!("/execution-environments/{id}"), &body);
    assert_eq!(answer.status, 201, "{}", answer.text());
}

/// The site root (the API base without `/api/v1`).
fn root(server: &TestServer) -> String {
    server.base.trim_end_matches("/api/v1").to_owned()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(TIMEOUT))
        .max_redirects(0)
        .build()
        .into()
}

/// `GET /` with the given headers: status, `Set-Cookie`, body.
fn page(server: &TestServer, headers: &[(&str, &str)]) -> (u16, String) {
    let mut request = agent().get(format!("{}/", root(server)));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut response = request.call().expect("GET /");
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().expect("body"))
}

fn log_in(server: &TestServer, token: &str) -> (u16, Option<String>, String) {
    let mut response = agent()
        .post(format!("{}/", root(server)))
        .content_type("application/x-www-form-urlencoded")
        .send(format!("token={token}"))
        .expect("POST /");
    let cookie = response
        .headers()
        .get("set-cookie")
        .and_then(|value| value.to_str().ok())
        .map(|value| value.split(';').next().unwrap_or_default().to_owned());
    let status = response.status().as_u16();
    (
        status,
        cookie,
        response.body_mut().read_to_string().expect("body"),
    )
}

#[test]
fn nothing_is_shown_without_the_token() {
    let server = server(Some(TOKEN));
    environment(&server, 42, ODD_IMAGE, 1);
    let (status, body) = page(&server, &[]);
    assert_eq!(status, 401);
    assert!(body.contains("<form method=\"post\""), "{body}");
    for secret in [
        "course",
        "environment-42",
        "Environments",
        env!("CARGO_PKG_VERSION"),
    ] {
        assert!(!body.contains(secret), "{secret} leaked: {body}");
    }
    // A wrong token, a wrong header and a made-up cookie get the form again.
    let (status, cookie, body) = log_in(&server, "wrong");
    assert_eq!((status, cookie), (401, None));
    assert!(
        body.contains("id=\"failed\"") && !body.contains("course"),
        "{body}"
    );
    assert_eq!(page(&server, &[("Poseidon-Token", "wrong")]).0, 401);
    let forged = format!("poseidon_status={TOKEN}");
    assert_eq!(page(&server, &[("Cookie", &forged)]).0, 401);
}

#[test]
fn the_header_or_the_login_form_shows_the_page() {
    let server = server(Some(TOKEN));
    environment(&server, 42, ODD_IMAGE, 1);
    server.wait_idle(42, 1);
    let (status, body) = page(&server, &[("Poseidon-Token", TOKEN)]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<tr id=\"environment-42\">"), "{body}");
    // Names are escaped, never markup.
    assert!(body.contains("course&lt;b&gt;&amp;&quot;x&quot;"), "{body}");
    assert!(!body.contains("course<b>"), "{body}");
    let (status, cookie, _) = log_in(&server, TOKEN);
    assert_eq!(status, 303);
    let cookie = cookie.expect("a session cookie");
    assert!(
        !cookie.contains(TOKEN),
        "the cookie must not carry the token: {cookie}"
    );
    let (status, body) = page(&server, &[("Cookie", &format!("other=1; {cookie}"))]);
    assert_eq!(status, 200);
    assert!(body.contains("<tr id=\"environment-42\">"), "{body}");
}

/// Headless Chromium with a fresh profile; `None` (skip) when it is not installed.
fn chromium(profile: &Path, args: &[&str]) -> Option<std::process::Output> {
    let binary = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|name| Command::new(name).arg("--version").output().is_ok())?;
    let mut child = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-proxy-server",
            "--hide-scrollbars",
            "--window-size=1000,700",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(child.wait_with_output().expect("output"))
}

/// Width, height and the share of pixels that differ from the top-left one (the background).
fn picture(png_file: &Path) -> (u32, u32, f64) {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_file).expect("screenshot"),
    ));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut pixels).expect("a frame");
    let step = info.color_type.samples();
    let pixels = &pixels[..info.buffer_size()];
    let background = &pixels[..step];
    let drawn = pixels
        .chunks(step)
        .filter(|pixel| *pixel != background)
        .count();
    (
        info.width,
        info.height,
        drawn as f64 / (pixels.len() / step) as f64,
    )
}

#[test]
fn the_page_renders_in_headless_chromium() {
    // Chromium runs in a network namespace of the test's own: it reaches the server on
    // loopback and nothing else.
    if !image_support::isolate_network() {
        return;
    }
    let dir = tempfile::tempdir().expect("directory");
    let server = server(None);
    environment(&server, 1, support::TEST_IMAGE, 2);
    environment(&server, 2, ODD_IMAGE, 1);
    server.wait_idle(1, 2);
    server.wait_idle(2, 1);
    let runner = server.runner(1, 0);
    // An execution that runs while the browser looks.
    let url = server.execute(&runner, "echo started; sleep 60", 120);
    let mut ws = Ws::connect(&url, None).expect("connect");
    ws.wait_for_stdout("started");

    let url = format!("{}/", root(&server));
    let Some(dom) = chromium(&dir.path().join("dom"), &["--dump-dom", &url]) else {
        eprintln!("skipped: chromium is not installed (apt-get install chromium)");
        return;
    };
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains("<tr id=\"environment-1\">"), "{dom}");
    assert!(dom.contains("<tr id=\"environment-2\">"), "{dom}");
    assert!(dom.contains("course&lt;b&gt;&amp;\"x\""), "{dom}");
    assert!(dom.contains("Running executions (1)"), "{dom}");
    assert!(dom.contains(&runner), "{dom}");

    let shot = dir.path().join("status.png");
    let screenshot = format!("--screenshot={}", shot.display());
    chromium(&dir.path().join("shot"), &[&screenshot, &url]).expect("chromium");
    let (width, height, drawn) = picture(&shot);
    assert_eq!((width, height), (1000, 700));
    // Tables, text and shading: far more than a blank or an error page.
    assert!(
        drawn > 0.05,
        "only {:.1} % of the pixels are drawn",
        drawn * 100.0
    );
    let blank = picture_of_login(&server, dir.path());
    eprintln!("drawn pixels: status page {drawn:.3}, login form {blank:.3}");
    assert!(drawn > 2.0 * blank, "page {drawn}, login form {blank}");
    drop(ws);
}

/// The share of drawn pixels of the login form, for comparison: a page that failed to show
/// its tables would look like it.
fn picture_of_login(_server: &TestServer, dir: &Path) -> f64 {
    let token_server = server(Some(TOKEN));
    environment(&token_server, 1, support::TEST_IMAGE, 1);
    let url = format!("{}/", root(&token_server));
    let dom = chromium(&dir.join("login-dom"), &["--dump-dom", &url]).expect("chromium");
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains("<form method=\"post\""), "{dom}");
    assert!(!dom.contains("environment-1"), "{dom}");
    let shot = dir.join("login.png");
    let screenshot = format!("--screenshot={}", shot.display());
    chromium(&dir.join("login-shot"), &[&screenshot, &url]).expect("chromium");
    picture(&shot).2
}
