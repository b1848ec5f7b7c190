//! Runner files over HTTP: PATCH (delete glob, directories, modes, base64, partial failure,
//! body limits), listings (fields, order, names, recursion, 424), raw downloads, and
//! confinement of every file operation to the runner's view (`..`, absolute paths, symlinks).

mod support;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use serde::Deserialize;
use serde_json::{Value, json};
use support::{Answer, KeyOrder, TIMEOUT, TestServer, base64};

const NOT_FOUND: &str = r#"{"message":"file not found or insufficient permissions"}"#;

fn patch(server: &TestServer, runner: &str, body: &Value) -> Answer {
    server.send("PATCH", &format!("/runners/{runner}/files"), body)
}

fn patch_raw(server: &TestServer, runner: &str, body: &[u8]) -> Answer {
    server.request("PATCH", &format!("/runners/{runner}/files"), Some(body))
}

fn file(path: &str, content: &[u8]) -> Value {
    json!({"path": path, "content": base64(content)})
}

fn list(server: &TestServer, runner: &str, query: &str) -> Answer {
    server.get(&format!("/runners/{runner}/files{query}"))
}

fn download(server: &TestServer, runner: &str, path: &str) -> Answer {
    server.get(&format!(
        "/runners/{runner}/files/raw?path={}",
        encode(path)
    ))
}

fn encode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// The entries of a successful listing.
#[track_caller]
fn entries(answer: &Answer) -> Vec<Value> {
    assert_eq!(answer.status, 200, "{}", answer.text());
    answer.json()["files"]
        .as_array()
        .expect("files is an array")
        .clone()
}

/// The names of a successful listing, in order.
#[track_caller]
fn names(answer: &Answer) -> Vec<String> {
    entries(answer)
        .iter()
        .map(|entry| entry["name"].as_str().expect("name").to_owned())
        .collect()
}

#[track_caller]
fn entry<'a>(entries: &'a [Value], name: &str) -> &'a Value {
    entries
        .iter()
        .find(|entry| entry["name"] == name)
        .unwrap_or_else(|| panic!("no entry {name:?} in {entries:?}"))
}

#[track_caller]
fn assert_not_found(answer: &Answer, what: &str) {
    assert_eq!(answer.status, 424, "{what}: {}", answer.text());
    assert_eq!(answer.text(), NOT_FOUND, "{what}");
    assert_eq!(
        answer.header("Content-Type"),
        Some("application/json"),
        "{what}"
    );
}

#[track_caller]
fn assert_downloads(server: &TestServer, runner: &str, path: &str, content: &[u8]) {
    let answer = download(server, runner, path);
    assert_eq!(answer.status, 200, "{path}: {}", answer.text());
    assert_eq!(answer.body, content, "{path}");
}

/// Runs learner code that plants files or links.
#[track_caller]
fn plant(server: &TestServer, runner: &str, command: &str) {
    let transcript = server.run(runner, command);
    assert_eq!(
        transcript.exit_code(),
        Some(0),
        "cannot run {command:?}: {transcript:?}"
    );
}

/// A directory outside every runner holding one file, to check that nothing reaches it.
struct HostDir {
    dir: tempfile::TempDir,
}

impl HostDir {
    fn new() -> HostDir {
        let dir = tempfile::tempdir().expect("host directory");
        std::fs::write(dir.path().join("secret"), "host secret").expect("secret");
        HostDir { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    #[track_caller]
    fn assert_untouched(&self) {
        let mut names: Vec<String> = std::fs::read_dir(self.path())
            .expect("host directory")
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["secret"], "the host directory was changed");
        assert_eq!(
            std::fs::read_to_string(self.path().join("secret")).unwrap(),
            "host secret"
        );
    }
}

/// Sends raw bytes to the HTTP listener and reads the status line and headers of the answer.
fn raw_head(addr: SocketAddr, request: &[u8]) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(request).expect("send");
    let mut head = Vec::new();
    let mut byte = [0];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!("no complete answer ({other:?}): {head:?}"),
        }
    }
    (stream, String::from_utf8_lossy(&head).into_owned())
}

fn health_over_tcp(addr: SocketAddr) -> String {
    let request = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    raw_head(addr, request).1
}

#[test]
fn patch_answers_204_with_an_empty_body_and_the_files_are_there() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let body = json!({"delete": ["./*"], "copy": [
        {"path": "lib/"}, file("main.py", b"print(1)\n"), file("lib/helper.py", b"x = 1\n")]});
    let answer = patch(&server, &runner, &body);
    assert_eq!(answer.status, 204, "{}", answer.text());
    assert!(answer.body.is_empty());
    assert_downloads(&server, &runner, "main.py", b"print(1)\n");
    assert_downloads(&server, &runner, "lib/helper.py", b"x = 1\n");
    assert_eq!(
        server.run(&runner, "cat main.py lib/helper.py").stdout,
        "print(1)\r\nx = 1\r\n"
    );
}

#[test]
fn an_empty_update_is_accepted_and_changes_nothing() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    server.copy(&runner, &[("a.txt", "a")]);
    for body in [
        json!({}),
        json!({"copy": [], "delete": []}),
        json!({"copy": null, "delete": null}),
    ] {
        let answer = patch(&server, &runner, &body);
        assert_eq!(answer.status, 204, "{body}: {}", answer.text());
    }
    assert_eq!(names(&list(&server, &runner, "")), ["./a.txt"]);
}

#[test]
fn malformed_patch_bodies_are_400_with_a_json_message() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let bodies: &[&[u8]] = &[
        b"",
        b"{",
        br#"{"copy": "a.txt"}"#,
        br#"{"copy": [{"path": 1, "content": ""}]}"#,
        br#"{"copy": [{"path": "a", "content": 5}]}"#,
        br#"{"delete": "./*"}"#,
        br#"{"delete": [1]}"#,
        br#"[["./*"], []]"#,
    ];
    let mut wrong = Vec::new();
    for body in bodies {
        let answer = patch_raw(&server, &runner, body);
        if answer.status != 400 || answer.message().is_empty() {
            wrong.push((String::from_utf8_lossy(body).into_owned(), answer.status));
        }
    }
    assert!(wrong.is_empty(), "not 400 with a message: {wrong:?}");
}

#[test]
fn the_delete_glob_removes_every_visible_entry_but_keeps_dotfiles() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    server.copy(
        &runner,
        &[
            ("old/", ""),
            ("old/deep/", ""),
            ("old/deep/x.txt", "x"),
            ("main.py", "old"),
            (".hidden", "kept"),
            (".config/", ""),
            (".config/settings", "kept too"),
        ],
    );
    plant(
        &server,
        &runner,
        "echo learner > output.txt; mkdir -p build; touch build/a.o",
    );
    let body = json!({"delete": ["./*"], "copy": [file("main.py", b"new")]});
    assert_eq!(patch(&server, &runner, &body).status, 204);
    assert_eq!(names(&list(&server, &runner, "?path=./")), ["./main.py"]);
    assert_downloads(&server, &runner, "main.py", b"new");
    assert_downloads(&server, &runner, ".hidden", b"kept");
    assert_downloads(&server, &runner, ".config/settings", b"kept too");
    assert_not_found(&download(&server, &runner, "old/deep/x.txt"), "old file");
    assert_not_found(&download(&server, &runner, "output.txt"), "learner file");
}

#[test]
fn deletes_happen_before_copies_and_name_single_paths() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    server.copy(
        &runner,
        &[
            ("a.txt", "a"),
            ("b.txt", "b"),
            ("dir/", ""),
            ("dir/c.txt", "c"),
        ],
    );
    let body = json!({"delete": ["a.txt", "dir", "missing", "./b.txt"],
                      "copy": [file("b.txt", b"new b")]});
    let answer = patch(&server, &runner, &body);
    assert_eq!(answer.status, 204, "{}", answer.text());
    assert_eq!(names(&list(&server, &runner, "")), ["./b.txt"]);
    assert_downloads(&server, &runner, "b.txt", b"new b");
}

#[test]
fn directory_entries_are_sticky_and_world_writable_and_files_are_0744() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let body = json!({"copy": [{"path": "src/"}, {"path": "src/main/java/"},
        {"path": "withcontent/", "content": base64(b"ignored")},
        file("src/main/java/A.java", b"class A {}"), file("top.txt", b"t")]});
    assert_eq!(patch(&server, &runner, &body).status, 204);
    let listing = entries(&list(&server, &runner, "?path=./&recursive=true"));
    for dir in ["./src", "./src/main/java", "./withcontent"] {
        let entry = entry(&listing, dir);
        assert_eq!(entry["entryType"], "d", "{entry}");
        assert_eq!(entry["permissions"], "rwxrwxrwt", "{entry}");
    }
    for name in ["./src/main/java/A.java", "./top.txt"] {
        let entry = entry(&listing, name);
        assert_eq!(entry["entryType"], "-", "{entry}");
        assert_eq!(entry["permissions"], "rwxr--r--", "{entry}");
    }
    assert_eq!(entry(&listing, "./top.txt")["size"], 1);
    assert_eq!(entry(&listing, "./src/main/java/A.java")["size"], 10);
}

#[test]
fn listing_entries_carry_poseidons_fields_in_order() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    server.copy(&runner, &[("dir/", ""), ("dir/b", "bb"), ("a", "aaa")]);
    plant(&server, &runner, "ln -sfn a link");
    let answer = list(&server, &runner, "?path=./&recursive=true");
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("Content-Type"), Some("application/json"));
    assert!(
        answer.text().starts_with(r#"{"files": ["#),
        "{}",
        answer.text()
    );
    #[derive(Deserialize)]
    struct Files {
        files: Vec<KeyOrder>,
    }
    let order: Files = serde_json::from_slice(&answer.body).expect("listing");
    let listing = entries(&answer);
    assert_eq!(order.files.len(), listing.len());
    for (keys, entry) in order.files.iter().zip(&listing) {
        let mut expected = vec!["name", "entryType"];
        if entry["entryType"] == "l" {
            expected.push("linkTarget");
        }
        expected.extend(["size", "modificationTime", "permissions", "owner", "group"]);
        assert_eq!(keys.0, expected, "{entry}");
        assert!(entry["size"].is_i64(), "{entry}");
        assert!(entry["modificationTime"].is_i64(), "{entry}");
        assert_eq!(entry["permissions"].as_str().unwrap().len(), 9, "{entry}");
        assert!(!entry["owner"].as_str().unwrap().is_empty(), "{entry}");
        assert!(!entry["group"].as_str().unwrap().is_empty(), "{entry}");
    }
    let link = entry(&listing, "./link");
    assert_eq!(link["entryType"], "l");
    assert_eq!(link["linkTarget"], "a");
    assert_eq!(entry(&listing, "./a")["size"], 3);
    assert_eq!(entry(&listing, "./dir/b")["size"], 2);
}

#[test]
fn a_recursive_listing_prefixes_names_with_the_path() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    server.copy(
        &runner,
        &[
            ("dir/", ""),
            ("dir/sub/", ""),
            ("dir/sub/c", "c"),
            ("dir/b", "b"),
            ("a", "a"),
        ],
    );
    assert_eq!(
        names(&list(&server, &runner, "?path=./&recursive=true")),
        ["./a", "./dir", "./dir/b", "./dir/sub", "./dir/sub/c"]
    );
    assert_eq!(
        names(&list(&server, &runner, "?path=dir&recursive=true")),
        ["dir/b", "dir/sub", "dir/sub/c"]
    );
    assert_eq!(
        names(&list(&server, &runner, "?path=dir/&recursive=true")),
        ["dir/b", "dir/sub", "dir/sub/c"]
    );
}

#[test]
fn a_flat_listing_uses_bare_names() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    server.copy(&runner, &[("dir/", ""), ("dir/b", "b"), ("a", "a")]);
    assert_eq!(
        names(&list(&server, &runner, "?path=./&recursive=false")),
        ["a", "dir"]
    );
    assert_eq!(
        names(&list(&server, &runner, "?path=dir&recursive=false")),
        ["b"]
    );
}

#[test]
fn hidden_entries_are_not_listed_unless_asked_for_by_name() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    server.copy(
        &runner,
        &[
            (".hidden", "h"),
            ("dir/", ""),
            ("dir/.x", "x"),
            ("dir/y", "y"),
            (".d/", ""),
            (".d/z", "z"),
        ],
    );
    assert_eq!(
        names(&list(&server, &runner, "?path=./")),
        ["./dir", "./dir/y"]
    );
    assert_eq!(names(&list(&server, &runner, "?path=.hidden")), [".hidden"]);
}

#[test]
fn listing_a_single_file_names_it_as_given() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    server.copy(&runner, &[("dir/", ""), ("dir/b", "bb"), ("a", "a")]);
    for path in ["dir/b", "./a", "a"] {
        let listing = entries(&list(&server, &runner, &format!("?path={path}")));
        assert_eq!(listing.len(), 1, "{listing:?}");
        assert_eq!(listing[0]["name"], path);
        assert_eq!(listing[0]["entryType"], "-");
    }
    let listing = entries(&list(&server, &runner, "?path=dir/b&recursive=false"));
    assert_eq!(listing[0]["name"], "dir/b");
    assert_eq!(listing[0]["size"], 2);
}

#[test]
fn listing_a_missing_path_is_424() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    server.copy(&runner, &[("a", "a")]);
    for path in ["missing", "missing/", "a/b", "./nope/x", "/nowhere"] {
        assert_not_found(
            &list(&server, &runner, &format!("?path={}", encode(path))),
            path,
        );
    }
}

#[test]
fn recursive_defaults_to_true_and_unparsable_values_mean_true() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    server.copy(&runner, &[("dir/", ""), ("dir/b", "b")]);
    for query in [
        "",
        "?path=./",
        "?recursive=maybe",
        "?path=./&recursive=",
        "?recursive=yes",
    ] {
        assert_eq!(
            names(&list(&server, &runner, query)),
            ["./dir", "./dir/b"],
            "query {query:?}"
        );
    }
    for query in ["?recursive=false", "?recursive=0", "?recursive=F"] {
        assert_eq!(names(&list(&server, &runner, query)), ["dir"], "{query}");
    }
}

#[test]
fn a_download_has_the_exact_bytes_length_and_disposition() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let content: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let body = json!({"copy": [{"path": "dir/"}, file("dir/data.bin", &content),
                               file("dir/with space.bin", &content)]});
    assert_eq!(patch(&server, &runner, &body).status, 204);
    for path in ["dir/data.bin", "./dir/data.bin", "dir/with space.bin"] {
        let answer = download(&server, &runner, path);
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.body, content);
        assert_eq!(answer.header("Content-Length"), Some("70000"));
        assert_eq!(
            answer.header("Content-Disposition").map(str::to_owned),
            Some(format!("attachment; filename=\"{path}\""))
        );
    }
}

#[test]
fn downloading_a_missing_file_or_a_directory_is_424() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    server.copy(&runner, &[("dir/", ""), ("dir/b", "b")]);
    for path in ["missing.txt", "dir", "dir/", "./", "", "dir/b/c"] {
        let answer = download(&server, &runner, path);
        assert_not_found(&answer, path);
        assert_eq!(
            answer.header("Content-Length").map(str::to_owned),
            Some(NOT_FOUND.len().to_string())
        );
    }
}

#[test]
fn content_must_be_strict_base64_and_a_bad_entry_changes_nothing() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    server.copy(&runner, &[("keep.txt", "kept")]);
    for bad in ["!!!!", "aGk", "aGk=x", "YQ", "aGk=aGk=", "a GsK"] {
        let body = json!({"delete": ["./*"],
                          "copy": [file("new.txt", b"new"), {"path": "bad.txt", "content": bad}]});
        let answer = patch(&server, &runner, &body);
        assert_eq!(answer.status, 400, "content {bad:?}: {}", answer.text());
        assert_eq!(answer.header("Content-Type"), Some("application/json"));
        assert!(!answer.message().is_empty());
    }
    assert_eq!(names(&list(&server, &runner, "")), ["./keep.txt"]);
    assert_downloads(&server, &runner, "keep.txt", b"kept");
}

#[test]
fn line_breaks_inside_base64_are_ignored() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let body = json!({"copy": [{"path": "a.txt", "content": "aGVs\r\nbG8=\n"}]});
    let answer = patch(&server, &runner, &body);
    assert_eq!(answer.status, 204, "{}", answer.text());
    assert_downloads(&server, &runner, "a.txt", b"hello");
}

#[test]
fn null_or_missing_content_makes_an_empty_file() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let body = json!({"copy": [{"path": "null.txt", "content": null}, {"path": "missing.txt"},
                               {"path": "empty.txt", "content": ""}]});
    assert_eq!(patch(&server, &runner, &body).status, 204);
    for path in ["null.txt", "missing.txt", "empty.txt"] {
        let answer = download(&server, &runner, path);
        assert_eq!(answer.status, 200, "{path}: {}", answer.text());
        assert!(answer.body.is_empty());
        assert_eq!(answer.header("Content-Length"), Some("0"));
        let listing = entries(&list(&server, &runner, &format!("?path={path}")));
        assert_eq!(listing[0]["size"], 0);
        assert_eq!(listing[0]["entryType"], "-");
    }
}

#[test]
fn copying_over_an_existing_file_replaces_it() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    server.copy(&runner, &[("a.txt", "a much longer first version")]);
    let body = json!({"copy": [file("a.txt", b"short")]});
    assert_eq!(patch(&server, &runner, &body).status, 204);
    assert_downloads(&server, &runner, "a.txt", b"short");
    let body = json!({"copy": [file("a.txt", b"one"), file("a.txt", b"two")]});
    assert_eq!(patch(&server, &runner, &body).status, 204);
    assert_downloads(&server, &runner, "a.txt", b"two");
}

#[test]
fn absolute_and_dotdot_paths_stay_inside_the_runner() {
    if !support::process_executor() {
        // A sandbox's view is its image, where `/etc/passwd` exists; tests/sandbox_files.rs
        // covers its confinement.
        return;
    }
    let server = TestServer::start();
    let runner = server.ready_runner();
    let state = server.state.path().to_owned();
    let passwd = std::fs::read("/etc/passwd").expect("host /etc/passwd");
    let environment = std::fs::read(state.join("environments/1.json")).expect("env file");
    assert_not_found(&download(&server, &runner, "/etc/passwd"), "host file");
    assert_not_found(
        &download(&server, &runner, "../../environments/1.json"),
        "state file",
    );
    assert_not_found(&list(&server, &runner, "?path=/etc"), "host dir");
    // `..` stops at the runner's root: this lists the (still empty) workspace.
    let above = list(&server, &runner, "?path=../..");
    assert!(names(&above).is_empty(), "{}", above.text());

    let body = json!({"copy": [
        file("/etc/passwd", b"pwned"),
        file("../../outside.txt", b"out"),
        file("../../environments/1.json", b"garbage"),
        file("dir/../../../../up.txt", b"up"),
    ]});
    let answer = patch(&server, &runner, &body);
    assert_eq!(answer.status, 204, "{}", answer.text());
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd);
    assert_eq!(
        std::fs::read(state.join("environments/1.json")).unwrap(),
        environment
    );
    assert!(!state.join("outside.txt").exists());
    assert!(!state.join("workspaces/outside.txt").exists());
    assert!(!state.join("workspaces/up.txt").exists());

    let listing = entries(&list(&server, &runner, "?path=/etc/passwd"));
    assert_eq!(listing[0]["name"], "/etc/passwd");
    assert_eq!(listing[0]["size"], 5);
    assert_downloads(&server, &runner, "/etc/passwd", b"pwned");
    assert_downloads(&server, &runner, "../../outside.txt", b"out");
    assert_downloads(&server, &runner, "outside.txt", b"out");
    assert_downloads(&server, &runner, "up.txt", b"up");
    assert_downloads(&server, &runner, "environments/1.json", b"garbage");
    let names = names(&list(&server, &runner, "?path=/"));
    for name in [
        "/etc/passwd",
        "/outside.txt",
        "/up.txt",
        "/environments/1.json",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} not in {names:?}");
    }

    let body = json!({"delete": ["/etc", "../../environments"]});
    assert_eq!(patch(&server, &runner, &body).status, 204);
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd);
    assert!(state.join("environments/1.json").exists());
    assert_not_found(&download(&server, &runner, "/etc/passwd"), "deleted copy");
}

#[test]
fn symlinks_inside_the_workspace_work_as_links() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    server.copy(
        &runner,
        &[("dir/", ""), ("dir/target.txt", "through the link")],
    );
    // The workspace is the view's root with the process executor, `/workspace` in a sandbox.
    let workspace = if support::process_executor() {
        ""
    } else {
        "/workspace"
    };
    plant(
        &server,
        &runner,
        &format!(
            "ln -sfn dir/target.txt link; ln -sfn dir dirlink; ln -sfn {workspace}/dir/target.txt absolute"
        ),
    );
    for path in ["link", "dirlink/target.txt", "absolute"] {
        let answer = download(&server, &runner, path);
        assert_eq!(answer.status, 200, "{path}: {}", answer.text());
        assert_eq!(answer.body, b"through the link", "{path}");
        assert_eq!(answer.header("Content-Length"), Some("16"), "{path}");
    }
    let listing = entries(&list(&server, &runner, "?path=link"));
    assert_eq!(listing.len(), 1);
    assert_eq!(listing[0]["entryType"], "l");
    assert_eq!(listing[0]["linkTarget"], "dir/target.txt");
    assert_eq!(
        names(&list(&server, &runner, "?path=dirlink/")),
        ["dirlink/target.txt"]
    );
}

#[test]
fn symlinks_planted_by_learner_code_cannot_reach_the_host() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let host = HostDir::new();
    let passwd = std::fs::read("/etc/passwd").expect("host /etc/passwd");
    let command = format!(
        "ln -sfn / escape; ln -sfn /etc/passwd pw; ln -sfn {} hostdir; ln -sfn {}/secret secret; \
         ln -sfn ../.. state",
        host.path().display(),
        host.path().display()
    );
    plant(&server, &runner, &command);

    // Reading through the links: nothing of the host (a sandbox's `host` image shows the
    // host's /etc read-only, by design, so `/etc` is checked for the process executor only).
    for path in ["hostdir/secret", "secret", "state/environments/1.json"] {
        assert_not_found(&download(&server, &runner, path), path);
    }
    for path in ["hostdir/", "state/environments"] {
        assert_not_found(&list(&server, &runner, &format!("?path={path}")), path);
    }
    if support::process_executor() {
        for path in ["pw", "escape/etc/passwd"] {
            assert_not_found(&download(&server, &runner, path), path);
        }
        for path in ["escape/etc", "escape/etc/"] {
            assert_not_found(&list(&server, &runner, &format!("?path={path}")), path);
        }
        let root = names(&list(&server, &runner, "?path=escape/"));
        assert!(
            !root
                .iter()
                .any(|name| ["escape/etc", "escape/usr", "escape/proc"].contains(&name.as_str())),
            "the listing shows the host's root: {root:?}"
        );
    }
    let listing = entries(&list(&server, &runner, "?path=./"));
    assert_eq!(entry(&listing, "./escape")["linkTarget"], "/");
    assert_eq!(entry(&listing, "./hostdir")["entryType"], "l");
    assert!(
        listing
            .iter()
            .all(|e| !e["name"].as_str().unwrap().starts_with("./hostdir/")),
        "the listing followed a link to the host: {listing:?}"
    );

    // Writing and deleting through the links.
    let unique = format!("poseidon-lite-test-{}", uuid::Uuid::new_v4());
    let body = json!({"copy": [
        file(&format!("escape/tmp/{unique}"), b"confined"),
        file("hostdir/planted", b"x"),
        file("pw", b"replaced link"),
        file("secret", b"replaced link"),
        file("escape/etc/passwd", b"confined"),
    ]});
    let answer = patch(&server, &runner, &body);
    assert!(
        matches!(answer.status, 204 | 500),
        "unexpected answer {}: {}",
        answer.status,
        answer.text()
    );
    assert!(
        !Path::new("/tmp").join(&unique).exists(),
        "wrote to host /tmp"
    );
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd);
    host.assert_untouched();
    if answer.status == 204 {
        assert_downloads(&server, &runner, &format!("/tmp/{unique}"), b"confined");
    }
    // A link in the path's last place is replaced, never followed.
    assert_downloads(&server, &runner, "pw", b"replaced link");
    let body = json!({"delete": ["hostdir/secret", "secret/", "escape/etc/passwd"]});
    assert_eq!(patch(&server, &runner, &body).status, 204);
    host.assert_untouched();
    let body = json!({"delete": ["./*"]});
    assert_eq!(patch(&server, &runner, &body).status, 204);
    host.assert_untouched();
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd);
    assert!(server.state.path().join("environments/1.json").exists());
}

/// `max_body_bytes` of the servers in the body-limit tests.
const LIMIT: u64 = 1024;

/// A PATCH body of exactly `length` bytes.
fn body_of_length(length: usize) -> Vec<u8> {
    let empty = json!({"copy": [{"path": "limit.txt", "content": ""}], "pad": ""}).to_string();
    let body = json!({"copy": [{"path": "limit.txt", "content": ""}],
                      "pad": "x".repeat(length - empty.len())});
    let body = body.to_string().into_bytes();
    assert_eq!(body.len(), length);
    body
}

#[test]
fn bodies_over_the_limit_are_413_and_change_nothing() {
    let server = TestServer::start_with(|config| config.server.max_body_bytes = LIMIT);
    let runner = server.ready_runner();
    let answer = patch_raw(&server, &runner, &body_of_length(LIMIT as usize + 1));
    assert_eq!(answer.status, 413, "{}", answer.text());
    assert!(!answer.message().is_empty());
    assert_not_found(&download(&server, &runner, "limit.txt"), "too large");
    let big = json!({"copy": [file("big.txt", &[b'x'; 4096])]});
    assert_eq!(patch(&server, &runner, &big).status, 413);
    assert_not_found(&download(&server, &runner, "big.txt"), "too large");

    let answer = patch_raw(&server, &runner, &body_of_length(LIMIT as usize));
    assert_eq!(answer.status, 204, "{}", answer.text());
    assert_downloads(&server, &runner, "limit.txt", b"");
    assert_eq!(server.get("/health").status, 204);
}

#[test]
fn a_large_content_length_with_a_short_body_gets_413_while_others_are_served() {
    let server = TestServer::start_with(|config| config.server.max_body_bytes = LIMIT);
    let runner = server.ready_runner();
    let addr = server.handle().http_addr();
    let mut stalled = Vec::new();
    for length in [100_000u64, 10_000_000_000] {
        let request = format!(
            "PATCH /api/v1/runners/{runner}/files HTTP/1.1\r\nHost: x\r\n\
             Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{\"copy\": ["
        );
        let (stream, head) = raw_head(addr, request.as_bytes());
        assert!(head.starts_with("HTTP/1.1 413"), "{head}");
        // The client keeps its connection open and sends nothing more.
        stalled.push(stream);
    }
    for _ in 0..(2 * 8) {
        assert!(health_over_tcp(addr).starts_with("HTTP/1.1 204"));
    }
    server.copy(&runner, &[("a.txt", "served")]);
    assert_downloads(&server, &runner, "a.txt", b"served");
    drop(stalled);
}

#[test]
fn a_huge_content_length_does_not_bring_the_server_down() {
    // The real binary in a child process: the request might bring the process down.
    let state = tempfile::tempdir().expect("state");
    let mut server = support::process::Process::start_with(
        state.path(),
        &["--executor", "process", "--max-body-bytes", "1024"],
    );
    let addr: SocketAddr = server
        .api
        .trim_start_matches("http://")
        .split('/')
        .next()
        .and_then(|addr| addr.parse().ok())
        .expect("the server logs its address");
    assert!(health_over_tcp(addr).starts_with("HTTP/1.1 204"));
    for length in ["1000000000000", "18446744073709551615"] {
        let request = format!(
            "PUT /api/v1/execution-environments/1 HTTP/1.1\r\nHost: x\r\n\
             Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{\"image\": \"x\""
        );
        let (stream, head) = raw_head(addr, request.as_bytes());
        assert!(head.starts_with("HTTP/1.1 413"), "{head}");
        drop(stream);
        for _ in 0..3 {
            assert!(
                health_over_tcp(addr).starts_with("HTTP/1.1 204"),
                "the server stopped serving after Content-Length {length}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            server.child.try_wait().expect("wait").is_none(),
            "the server died after Content-Length {length}"
        );
    }
}

#[test]
fn a_partly_failing_copy_is_500_unknown_while_the_other_files_are_written() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    server.copy(&runner, &[("a.txt", "a file")]);
    let body = json!({"copy": [file("a.txt/b", b"x"), file("c.txt", b"written"),
                               {"path": "a.txt/d/"}, file("e.txt", b"also written")]});
    let answer = patch(&server, &runner, &body);
    assert_eq!(answer.status, 500, "{}", answer.text());
    assert_eq!(answer.header("Content-Type"), Some("application/json"));
    let error = answer.json();
    assert_eq!(error["errorCode"], "UNKNOWN", "{error}");
    let message = error["message"].as_str().expect("message");
    assert!(message.starts_with("file copy failed: "), "{message}");
    assert!(message.contains("a.txt/b"), "{message}");
    assert_eq!(
        error.as_object().unwrap().len(),
        2,
        "only message and errorCode: {error}"
    );
    assert_downloads(&server, &runner, "c.txt", b"written");
    assert_downloads(&server, &runner, "e.txt", b"also written");
    assert_downloads(&server, &runner, "a.txt", b"a file");
}

#[test]
fn copies_and_deletions_never_go_through_a_symlink_in_the_workspace() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    server.copy(&runner, &[("real/", ""), ("real/kept.txt", "kept")]);
    // Learner code points a link at a directory; root-made changes must not follow it.
    plant(&server, &runner, "ln -sfn real link");
    let body = json!({"copy": [file("link/planted.txt", b"x"), file("plain.txt", b"ok")]});
    let answer = patch(&server, &runner, &body);
    assert_eq!(answer.status, 500, "{}", answer.text());
    assert!(
        answer.message().contains("link/planted.txt"),
        "{}",
        answer.text()
    );
    assert_not_found(
        &download(&server, &runner, "real/planted.txt"),
        "written through the link",
    );
    assert_downloads(&server, &runner, "plain.txt", b"ok");
    let body = json!({"delete": ["link/kept.txt"]});
    assert_eq!(patch(&server, &runner, &body).status, 204);
    assert_downloads(&server, &runner, "real/kept.txt", b"kept");
}
