//! What README.md shows, run as written.

use forkscope_tests::{ServerBuilder, repo_root, request};

/// The first command of README.md that runs forkscope-server (`cargo run ... -- ARGS`), as its
/// arguments.
fn readme_quick_start() -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let line = readme
        .lines()
        .find(|l| l.starts_with("cargo run") && l.contains("-p forkscope-server -- "))
        .expect("README.md runs forkscope-server with cargo run");
    let (_, args) = line.split_once(" -- ").expect("arguments after --");
    args.split_whitespace().map(str::to_owned).collect()
}

/// The README's quick start serves its example app: the same app, folder and worker count,
/// on a free port instead of 8000 (tests run side by side).
#[test]
fn the_readme_quick_start_serves_its_example_app() {
    let args = readme_quick_start();
    let mut builder = None;
    let (mut chdir, mut workers, mut rest) = (None, 1, Vec::new());
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--chdir" => chdir = it.next().cloned(),
            "-w" | "--workers" => {
                workers = it.next().and_then(|n| n.parse().ok()).expect("-w N");
            }
            "-b" | "--bind" => {
                it.next();
            }
            app if !app.starts_with('-') && it.len() == 0 => {
                builder = Some(ServerBuilder::new(app));
            }
            other => rest.push(other),
        }
    }
    let chdir = repo_root().join(chdir.expect("--chdir in the quick start"));
    let s = builder
        .expect("an app as the last argument")
        .chdir(&chdir)
        .workers(workers)
        .args(&rest)
        .start();
    assert_eq!(s.workers().len(), workers as usize);
    let r = request(s.addr, "GET", "/", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "Hello from forkscope!\n");
}
