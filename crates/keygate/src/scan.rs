//! `keygate scan`: finds leaked keygate tokens in files and, optionally, in every commit of git history.
//!
//! A candidate is a word-boundary match of a known prefix, `_` and 61 letters or digits; it is
//! reported only when its checksum is right, so random strings of the same shape are ignored.
//! Findings name the token by public id and last four characters; the full token stays in memory
//! (for an online check) and is never printed.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Display;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use keygate_core::secret::TokenSecret;
use keygate_core::token_format::{BODY_LEN, TokenPrefix, parse_any};
use regex::Regex;

/// Files larger than this are skipped.
const MAX_FILE_LEN: u64 = 50 * 1024 * 1024;
/// A NUL byte in this many leading bytes marks a file as binary.
const BINARY_SNIFF_LEN: usize = 8 * 1024;
/// Directories never descended into.
const SKIPPED_DIRS: [&str; 2] = [".git", "target"];
/// Marks the start of each commit in the `git log` output we ask for.
const COMMIT_MARKER: &str = "keygate-scan-commit ";
/// Length of the abbreviated commit id in a history location.
const SHORT_SHA_LEN: usize = 12;
const FILES_TEMPLATE: &str = "scanning {bar:30} {pos}/{len} files ({elapsed})";
const HISTORY_TEMPLATE: &str = "{spinner} git history of {msg}: {pos} commits ({elapsed})";

/// What to scan and for which token prefixes.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Files and directories; directories are walked recursively.
    pub paths: Vec<PathBuf>,
    /// Token prefixes to look for, such as `["kg", "kgroot"]`.
    pub prefixes: Vec<String>,
    /// Also scan the lines added by every commit of the git repositories the paths are in.
    pub git_history: bool,
    /// Scan only the lines staged for the next commit in the git repositories the paths are in
    /// (`git diff --cached`), for a pre-commit hook; files and history are not read.
    pub staged: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// One confirmed token at one place.
#[derive(Debug, Clone)]
pub struct Finding {
    /// `path:line`, or `commit <short sha> path:line` for a line added in history.
    pub location: String,
    /// `<prefix>_<public id>…<last4>`: safe to print, never the secret part.
    pub display: String,
    /// The whole token, for an online check. Its `Debug` is redacted; do not print it.
    pub token: TokenSecret,
}

/// Scans `opts.paths` (and, with `git_history`, their repositories' history) for tokens.
///
/// Paths named explicitly are always scanned; inside directories, `.git` and `target`
/// directories, symbolic links, binary files and files over 50 MiB are skipped. Unreadable
/// files produce a warning on stderr and the scan goes on.
pub fn scan(opts: &ScanOptions) -> anyhow::Result<Vec<Finding>> {
    let matcher = Matcher::new(&opts.prefixes)?;
    let mut out = Findings::default();

    if opts.staged {
        let repos = repositories(&opts.paths, &ProgressBar::hidden())?;
        if repos.is_empty() {
            bail!("--staged scans what is staged in a git work tree, and none of the paths is in one");
        }
        for (repo, pathspecs) in repos {
            let args = ["diff", "--cached"];
            run_git_diff(&matcher, &repo, &args, &pathspecs, "staged", &ProgressBar::hidden(), &mut out)?;
        }
        return Ok(out.list);
    }

    let files = collect_files(&opts.paths)?;
    let bar = files_bar(opts.progress, files.len());
    for file in &files {
        match read_text(file) {
            Ok(Some(text)) => scan_text(&matcher, &text, &file.display().to_string(), &mut out),
            Ok(None) => {}
            Err(e) => warn(&bar, format_args!("skipping {}: {e:#}", file.display())),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();

    if opts.git_history {
        for (repo, pathspecs) in repositories(&opts.paths, &bar)? {
            let spinner = history_spinner(opts.progress, &repo);
            let format = format!("--format={COMMIT_MARKER}%H");
            let args = ["log", "--all", "--no-show-signature", format.as_str()];
            let result = run_git_diff(&matcher, &repo, &args, &pathspecs, "", &spinner, &mut out);
            spinner.finish_and_clear();
            result?;
        }
    }
    Ok(out.list)
}

/// The regex for candidates and the prefixes a confirmed token must have.
struct Matcher {
    regex: Regex,
    prefixes: Vec<String>,
}

impl Matcher {
    fn new(prefixes: &[String]) -> anyhow::Result<Self> {
        if prefixes.is_empty() {
            bail!("no token prefixes to scan for");
        }
        let mut sorted = Vec::with_capacity(prefixes.len());
        for p in prefixes {
            sorted.push(TokenPrefix::new(p)?.as_str().to_owned());
        }
        // Longest first, so the alternation reads naturally; the match is the same either way.
        sorted.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        sorted.dedup();
        let alternatives: Vec<String> = sorted.iter().map(|p| regex::escape(p)).collect();
        let pattern = format!(r"\b(?:{})_[0-9A-Za-z]{{{BODY_LEN}}}\b", alternatives.join("|"));
        let regex = Regex::new(&pattern).context("building the token pattern")?;
        Ok(Self { regex, prefixes: sorted })
    }

    /// Confirmed tokens in `text`, with their byte offsets.
    fn confirmed<'t>(&'t self, text: &'t str) -> impl Iterator<Item = (usize, String, TokenSecret)> + 't {
        self.regex.find_iter(text).filter_map(|m| {
            let parsed = parse_any(m.as_str()).ok()?;
            if !self.prefixes.iter().any(|p| p == parsed.prefix) {
                return None;
            }
            let display = format!("{}_{}…{}", parsed.prefix, parsed.public_id, parsed.last4);
            Some((m.start(), display, TokenSecret::new(m.as_str().to_owned())))
        })
    }
}

/// Findings in order of discovery, each (location, token) pair once.
#[derive(Default)]
struct Findings {
    list: Vec<Finding>,
    seen: HashSet<(String, String)>,
}

impl Findings {
    fn push(&mut self, location: String, display: String, token: TokenSecret) {
        if self.seen.insert((location.clone(), token.expose().to_owned())) {
            self.list.push(Finding { location, display, token });
        }
    }
}

/// Records every confirmed token of a whole file, with 1-based line numbers.
fn scan_text(matcher: &Matcher, text: &str, name: &str, out: &mut Findings) {
    let bytes = text.as_bytes();
    let (mut line, mut counted_to) = (1usize, 0usize);
    for (start, display, token) in matcher.confirmed(text) {
        line += bytes.get(counted_to..start).unwrap_or_default().iter().filter(|b| **b == b'\n').count();
        counted_to = start;
        out.push(format!("{name}:{line}"), display, token);
    }
}

/// The regular files to scan, in a stable order, each once even if named twice.
fn collect_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut seen = HashSet::new();
    for path in paths {
        let meta = fs::metadata(path).with_context(|| format!("cannot scan {}", path.display()))?;
        if meta.is_dir() {
            walk(path, &mut files, &mut seen);
        } else if meta.is_file() {
            add_file(path, &mut files, &mut seen);
        } else {
            bail!("cannot scan {}: not a regular file or directory", path.display());
        }
    }
    Ok(files)
}

fn add_file(path: &Path, files: &mut Vec<PathBuf>, seen: &mut HashSet<PathBuf>) {
    let key = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if seen.insert(key) {
        files.push(path.to_path_buf());
    }
}

/// Walks `dir` without following symbolic links, skipping `.git` and `target` directories.
fn walk(dir: &Path, files: &mut Vec<PathBuf>, seen: &mut HashSet<PathBuf>) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                eprintln!("warning: skipping {}: {e}", dir.display());
                continue;
            }
        };
        let mut children: Vec<(PathBuf, fs::FileType)> = entries
            .filter_map(|entry| {
                let entry = entry.ok()?;
                Some((entry.path(), entry.file_type().ok()?))
            })
            .collect();
        children.sort_by(|a, b| a.0.cmp(&b.0));
        let mut subdirs = Vec::new();
        for (path, kind) in children {
            if kind.is_dir() {
                let skipped = path.file_name().is_some_and(|n| SKIPPED_DIRS.iter().any(|s| n == *s));
                if !skipped {
                    subdirs.push(path);
                }
            } else if kind.is_file() {
                add_file(&path, files, seen);
            }
        }
        // Reversed so the stack visits subdirectories in name order.
        stack.extend(subdirs.into_iter().rev());
    }
}

/// The file as text, or `None` if it is binary or too large.
fn read_text(path: &Path) -> anyhow::Result<Option<String>> {
    let file = File::open(path)?;
    if file.metadata()?.len() > MAX_FILE_LEN {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    // Read one byte past the limit so a file that grew since the check is caught too.
    file.take(MAX_FILE_LEN + 1).read_to_end(&mut bytes)?;
    let too_long = u64::try_from(bytes.len()).map_or(true, |n| n > MAX_FILE_LEN);
    let sniff = bytes.get(..BINARY_SNIFF_LEN).unwrap_or(&bytes);
    if too_long || sniff.contains(&0) {
        return Ok(None);
    }
    // Tokens are ASCII, so replacing invalid UTF-8 loses none and keeps every newline.
    Ok(Some(match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }))
}

/// The git work trees holding `paths`, each with the pathspecs (relative to its top) to scan;
/// an empty list means the whole repository.
fn repositories(paths: &[PathBuf], bar: &ProgressBar) -> anyhow::Result<BTreeMap<PathBuf, Vec<PathBuf>>> {
    let mut repos: BTreeMap<PathBuf, Option<Vec<PathBuf>>> = BTreeMap::new();
    for path in paths {
        let Some(top) = work_tree_top(path)? else {
            warn(bar, format_args!("{} is not inside a git work tree; its history is not scanned", path.display()));
            continue;
        };
        let full = fs::canonicalize(path).with_context(|| format!("cannot resolve {}", path.display()))?;
        let relative = full.strip_prefix(&top).map(Path::to_path_buf).unwrap_or_default();
        let specs = repos.entry(top).or_insert_with(|| Some(Vec::new()));
        if relative.as_os_str().is_empty() {
            *specs = None;
        } else if let Some(list) = specs {
            list.push(relative);
        }
    }
    Ok(repos.into_iter().map(|(top, specs)| (top, specs.unwrap_or_default())).collect())
}

/// The top of the git work tree `path` is in, canonicalized, or `None` if it is in none.
fn work_tree_top(path: &Path) -> anyhow::Result<Option<PathBuf>> {
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    };
    let output = Command::new("git")
        .arg("-C")
        .arg(&dir)
        .args(["rev-parse", "--show-toplevel"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("git history was asked for, but git could not be run")?;
    if !output.status.success() {
        return Ok(None);
    }
    let top = String::from_utf8_lossy(&output.stdout).trim_end_matches(['\n', '\r']).to_owned();
    if top.is_empty() {
        return Ok(None);
    }
    Ok(Some(fs::canonicalize(&top).unwrap_or_else(|_| PathBuf::from(top))))
}

/// Runs `git <command>` (`log --all`: every commit of every ref; `diff --cached`: what is staged)
/// in `repo` as a patch and scans the lines it adds; `label` names where the lines are until a
/// commit header says otherwise.
fn run_git_diff(
    matcher: &Matcher,
    repo: &Path,
    command: &[&str],
    pathspecs: &[PathBuf],
    label: &str,
    bar: &ProgressBar,
    out: &mut Findings,
) -> anyhow::Result<()> {
    let mut child = Command::new("git")
        // Paths are taken literally, printed unescaped where possible, and the diff prefixes are
        // the standard ones whatever the user's configuration says.
        .args(["--literal-pathspecs", "-c", "core.quotePath=false", "-C"])
        .arg(repo)
        .args(command)
        .args(["-p", "--no-color", "-U0", "--no-ext-diff", "--no-textconv", "--src-prefix=a/", "--dst-prefix=b/"])
        .arg("--")
        .args(pathspecs)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run git log in {}", repo.display()))?;

    // Drain stderr on its own thread so a chatty git cannot block on a full pipe.
    let stderr = child.stderr.take();
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = stderr {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    });

    let parsed = match child.stdout.take() {
        Some(stdout) => parse_log(matcher, BufReader::new(stdout), label, bar, out),
        None => Err(anyhow::anyhow!("git log produced no output pipe")),
    };
    if parsed.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().with_context(|| format!("waiting for git log in {}", repo.display()))?;
    let stderr_text = stderr_reader.join().unwrap_or_default();
    parsed.with_context(|| format!("reading git log of {}", repo.display()))?;
    if !status.success() {
        bail!("git log failed in {} ({status}): {}", repo.display(), stderr_text.trim());
    }
    Ok(())
}

/// Where the parser of `git log -p -U0` output is.
#[derive(Default)]
struct DiffState {
    commit: String,
    /// The file the current diff adds lines to, if any (`None` for a deletion).
    path: Option<String>,
    old_left: u64,
    new_left: u64,
    next_line: u64,
}

/// Scans the added lines of `git log -p -U0` output (with [`COMMIT_MARKER`] commit headers).
fn parse_log(
    matcher: &Matcher,
    mut input: impl BufRead,
    label: &str,
    bar: &ProgressBar,
    out: &mut Findings,
) -> anyhow::Result<()> {
    let mut state = DiffState { commit: label.to_owned(), ..DiffState::default() };
    let mut raw = Vec::new();
    loop {
        raw.clear();
        if input.read_until(b'\n', &mut raw)? == 0 {
            return Ok(());
        }
        if raw.last() == Some(&b'\n') {
            raw.pop();
        }
        let line = String::from_utf8_lossy(&raw);

        if state.old_left > 0 || state.new_left > 0 {
            // Inside a hunk, counted by its header, so a "+++" or "@@" line here is content.
            match raw.first() {
                Some(b'+') if state.new_left > 0 => {
                    if let Some(path) = &state.path {
                        let content = line.get(1..).unwrap_or_default();
                        for (_, display, token) in matcher.confirmed(content) {
                            let location = format!("{} {path}:{}", state.commit, state.next_line);
                            out.push(location, display, token);
                        }
                    }
                    state.new_left -= 1;
                    state.next_line += 1;
                    continue;
                }
                Some(b'-') if state.old_left > 0 => {
                    state.old_left -= 1;
                    continue;
                }
                Some(b'\\') => continue, // "\ No newline at end of file"
                _ => {
                    // The hunk was shorter than announced; treat this line as a header.
                    state.old_left = 0;
                    state.new_left = 0;
                }
            }
        } else if raw.first() == Some(&b'\\') {
            continue;
        }

        if let Some(sha) = line.strip_prefix(COMMIT_MARKER) {
            let short: String = sha.trim().chars().take(SHORT_SHA_LEN).collect();
            state = DiffState { commit: format!("commit {short}"), ..DiffState::default() };
            bar.inc(1);
        } else if line.starts_with("diff --git ") {
            state.path = None;
        } else if let Some(name) = line.strip_prefix("+++ ") {
            state.path = new_side_path(name);
        } else if let Some((old_count, new_start, new_count)) = hunk_header(&line) {
            state.old_left = old_count;
            state.new_left = new_count;
            state.next_line = new_start;
        }
    }
}

/// The path of a `+++ b/path` line, or `None` for `/dev/null`.
fn new_side_path(name: &str) -> Option<String> {
    // git appends a tab when the name contains a space.
    let name = name.strip_suffix('\t').unwrap_or(name);
    if name == "/dev/null" {
        return None;
    }
    let name = if name.starts_with('"') { unquote(name) } else { name.to_owned() };
    Some(name.strip_prefix("b/").map(str::to_owned).unwrap_or(name))
}

/// Parses `@@ -a[,b] +c[,d] @@…` into (b, c, d); a missing count is 1.
fn hunk_header(line: &str) -> Option<(u64, u64, u64)> {
    let rest = line.strip_prefix("@@ -")?;
    let (old, rest) = rest.split_once(' ')?;
    let new = rest.strip_prefix('+')?.split(' ').next()?;
    let count = |range: &str| -> Option<(u64, u64)> {
        match range.split_once(',') {
            Some((start, n)) => Some((start.parse().ok()?, n.parse().ok()?)),
            None => Some((range.parse().ok()?, 1)),
        }
    };
    let (_, old_count) = count(old)?;
    let (new_start, new_count) = count(new)?;
    Some((old_count, new_start, new_count))
}

/// Undoes git's C-style quoting of an unusual path: `"b/tab\there"`.
fn unquote(quoted: &str) -> String {
    let inner = quoted.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(quoted);
    let mut bytes = Vec::with_capacity(inner.len());
    let mut it = inner.bytes().peekable();
    while let Some(b) = it.next() {
        if b != b'\\' {
            bytes.push(b);
            continue;
        }
        match it.next() {
            Some(b'n') => bytes.push(b'\n'),
            Some(b't') => bytes.push(b'\t'),
            Some(b'r') => bytes.push(b'\r'),
            Some(b'a') => bytes.push(0x07),
            Some(b'b') => bytes.push(0x08),
            Some(b'f') => bytes.push(0x0c),
            Some(b'v') => bytes.push(0x0b),
            Some(d @ b'0'..=b'7') => {
                let mut value = u32::from(d - b'0');
                for _ in 0..2 {
                    match it.peek() {
                        Some(n @ b'0'..=b'7') => {
                            value = value * 8 + u32::from(n - b'0');
                            it.next();
                        }
                        _ => break,
                    }
                }
                bytes.push(u8::try_from(value).unwrap_or(b'?'));
            }
            Some(other) => bytes.push(other),
            None => bytes.push(b'\\'),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn files_bar(progress: bool, total: usize) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(FILES_TEMPLATE) {
        bar.set_style(style);
    }
    bar
}

fn history_spinner(progress: bool, repo: &Path) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let spinner = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(HISTORY_TEMPLATE) {
        spinner.set_style(style);
    }
    spinner.set_message(repo.display().to_string());
    spinner.enable_steady_tick(Duration::from_millis(120));
    spinner
}

/// Prints a warning on stderr without tearing the progress bar.
fn warn(bar: &ProgressBar, message: impl Display) {
    bar.suspend(|| eprintln!("warning: {message}"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::secret::OsRandom;
    use keygate_core::token_format::{PUBLIC_ID_LEN, SECRET_LEN, mint};

    fn token() -> String {
        mint(&TokenPrefix::default(), &OsRandom).unwrap().secret.expose().to_owned()
    }

    fn opts(paths: &[&Path], git_history: bool) -> ScanOptions {
        ScanOptions {
            paths: paths.iter().map(|p| p.to_path_buf()).collect(),
            prefixes: vec!["kg".into(), "kgroot".into()],
            git_history,
            staged: false,
            progress: false,
        }
    }

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"])
            .args(args)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn a_confirmed_token_is_found_on_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let tok = token();
        fs::create_dir_all(dir.path().join("src/deep")).unwrap();
        let file = dir.path().join("src/deep/config.env");
        fs::write(&file, format!("# settings\nNAME=x\n\nKEYGATE_TOKEN=\"{tok}\" # oops\n")).unwrap();
        fs::write(dir.path().join("clean.txt"), "nothing here\n").unwrap();

        let found = scan(&opts(&[dir.path()], false)).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].location, format!("{}:4", file.display()));
        assert_eq!(found[0].token.expose(), tok);
    }

    #[test]
    fn several_tokens_get_their_own_lines_and_root_keys_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (token(), token());
        let root = mint(&TokenPrefix::default().root_key_prefix(), &OsRandom).unwrap().secret.expose().to_owned();
        let file = dir.path().join("f.txt");
        fs::write(&file, format!("{a} and {b}\nx\n\ny={root}\r\n")).unwrap();
        let found = scan(&opts(&[&file], false)).unwrap();
        let got: Vec<(&str, &str)> = found.iter().map(|f| (f.location.as_str(), f.token.expose())).collect();
        let name = file.display().to_string();
        let (l1, l4) = (format!("{name}:1"), format!("{name}:4"));
        assert_eq!(got, vec![(l1.as_str(), a.as_str()), (l1.as_str(), b.as_str()), (l4.as_str(), root.as_str())]);
        assert!(found[2].display.starts_with("kgroot_"));
    }

    #[test]
    fn a_broken_checksum_or_foreign_prefix_is_not_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut typo = token().into_bytes();
        typo[20] = if typo[20] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(typo).unwrap();
        let other = mint(&TokenPrefix::new("acme").unwrap(), &OsRandom).unwrap().secret.expose().to_owned();
        let good = token();
        // Glued to more word characters: not a whole token.
        let glued = format!("x_{good} {good}9 {good}_");
        fs::write(dir.path().join("a.txt"), format!("{typo}\n{other}\n{glued}\n")).unwrap();
        assert!(scan(&opts(&[dir.path()], false)).unwrap().is_empty());
    }

    #[test]
    fn the_display_never_contains_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let minted = mint(&TokenPrefix::default(), &OsRandom).unwrap();
        let tok = minted.secret.expose();
        fs::write(dir.path().join("a.txt"), tok).unwrap();
        let found = scan(&opts(&[dir.path()], false)).unwrap();
        assert_eq!(found.len(), 1);
        let secret = &tok[3 + PUBLIC_ID_LEN..3 + PUBLIC_ID_LEN + SECRET_LEN];
        assert_eq!(found[0].display, format!("kg_{}…{}", minted.public_id, minted.last4));
        assert!(!found[0].display.contains(secret));
        assert!(!found[0].display.contains(tok));
        let debug = format!("{:?}", found[0]);
        assert!(!debug.contains(secret), "{debug}");
        assert!(!found[0].location.contains(secret));
    }

    #[test]
    fn git_binary_large_and_repeated_paths_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        for sub in [".git", "target", "crate/target"] {
            fs::create_dir_all(dir.path().join(sub)).unwrap();
            fs::write(dir.path().join(sub).join("leak.txt"), token()).unwrap();
        }
        fs::write(dir.path().join("blob.bin"), format!("\0\0{}", token())).unwrap();
        // Text for its first 8 KiB (so only its size excludes it), then a sparse tail.
        fs::write(dir.path().join("big.txt"), format!("{}\n{}", token(), "a".repeat(BINARY_SNIFF_LEN))).unwrap();
        let big = fs::OpenOptions::new().append(true).open(dir.path().join("big.txt")).unwrap();
        big.set_len(MAX_FILE_LEN + 1).unwrap();
        let kept = token();
        fs::write(dir.path().join("crate/kept.txt"), &kept).unwrap();

        // The same directory twice, once through a different spelling: one finding.
        let again = dir.path().join("crate/..");
        let found = scan(&opts(&[dir.path(), &again], false)).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].token.expose(), kept);
        // Named explicitly, a skipped directory is scanned.
        assert_eq!(scan(&opts(&[&dir.path().join("target")], false)).unwrap().len(), 1);
    }

    #[test]
    fn bad_options_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(&[dir.path()], false);
        o.prefixes = vec!["Not-A-Prefix".into()];
        assert!(scan(&o).is_err());
        o.prefixes.clear();
        assert!(scan(&o).is_err());
        assert!(scan(&opts(&[&dir.path().join("missing")], false)).is_err());
    }

    #[test]
    fn a_token_committed_then_deleted_is_found_in_history() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path();
        git(repo, &["init", "-q"]);
        let tok = token();
        fs::create_dir_all(repo.join("conf")).unwrap();
        fs::write(repo.join("README"), "hello\n").unwrap();
        fs::write(repo.join("conf/app env.toml"), format!("a = 1\nb = 2\ntoken = \"{tok}\"\n")).unwrap();
        git(repo, &["add", "-A"]);
        git(repo, &["commit", "-q", "-m", "add config"]);
        let sha = git(repo, &["rev-parse", "HEAD"]).trim().to_owned();
        fs::remove_file(repo.join("conf/app env.toml")).unwrap();
        git(repo, &["add", "-A"]);
        git(repo, &["commit", "-q", "-m", "remove the leak"]);

        // The work tree is clean now.
        assert!(scan(&opts(&[repo], false)).unwrap().is_empty());
        let found = scan(&opts(&[repo], true)).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].location, format!("commit {} conf/app env.toml:3", &sha[..12]));
        assert_eq!(found[0].token.expose(), tok);
    }

    #[test]
    fn staged_scans_only_what_the_next_commit_adds() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path();
        git(repo, &["init", "-q"]);
        let (old, staged, unstaged) = (token(), token(), token());
        // Nothing committed yet: the first commit's staged files are new files.
        fs::write(repo.join("a.env"), "x = 1\n").unwrap();
        git(repo, &["add", "-A"]);
        assert!(scan(&ScanOptions { staged: true, ..opts(&[repo], false) }).unwrap().is_empty());
        fs::write(repo.join("a.env"), format!("x = 1\nold = {old}\n")).unwrap();
        git(repo, &["add", "-A"]);
        let found = scan(&ScanOptions { staged: true, ..opts(&[repo], false) }).unwrap();
        assert_eq!(found.iter().map(|f| f.location.as_str()).collect::<Vec<_>>(), vec!["staged a.env:2"]);
        git(repo, &["commit", "-q", "-m", "one"]);
        // Committed lines are not staged any more; a staged line is found, an unstaged one is not.
        fs::write(repo.join("b.txt"), format!("k={staged}\n")).unwrap();
        git(repo, &["add", "b.txt"]);
        fs::write(repo.join("b.txt"), format!("k={staged}\nj={unstaged}\n")).unwrap();
        let found = scan(&ScanOptions { staged: true, ..opts(&[repo], false) }).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].location.as_str(), found[0].token.expose()), ("staged b.txt:1", staged.as_str()));
        // Not a repository: a clear error.
        let plain = tempfile::tempdir().unwrap();
        let err = scan(&ScanOptions { staged: true, ..opts(&[plain.path()], false) }).unwrap_err();
        assert!(err.to_string().contains("git work tree"), "{err}");
    }

    #[test]
    fn tree_and_history_findings_are_kept_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path();
        git(repo, &["init", "-q"]);
        let tok = token();
        fs::create_dir_all(repo.join("src")).unwrap();
        fs::create_dir_all(repo.join("docs")).unwrap();
        fs::write(repo.join("src/lib.rs"), format!("// {tok}\n")).unwrap();
        fs::write(repo.join("docs/old.md"), format!("\n{}\n", token())).unwrap();
        git(repo, &["add", "-A"]);
        git(repo, &["commit", "-q", "-m", "one"]);
        let sha = git(repo, &["rev-parse", "--short=12", "HEAD"]).trim().to_owned();

        // The repository twice: once as a whole and once through a subdirectory.
        let found = scan(&opts(&[repo, &repo.join("src")], true)).unwrap();
        let locations: Vec<&str> = found.iter().map(|f| f.location.as_str()).collect();
        let tree = format!("{}:1", repo.join("src/lib.rs").display());
        let history_src = format!("commit {sha} src/lib.rs:1");
        let history_docs = format!("commit {sha} docs/old.md:2");
        assert_eq!(locations.iter().filter(|l| **l == tree).count(), 1, "{locations:?}");
        assert_eq!(locations.iter().filter(|l| **l == history_src).count(), 1, "{locations:?}");
        assert_eq!(locations.iter().filter(|l| **l == history_docs).count(), 1, "{locations:?}");
        assert_eq!(found.len(), 4, "{locations:?}");

        // Only src: the history of docs/ is out of scope.
        let found = scan(&opts(&[&repo.join("src")], true)).unwrap();
        let locations: Vec<&str> = found.iter().map(|f| f.location.as_str()).collect();
        assert!(!locations.iter().any(|l| l.contains("docs/")), "{locations:?}");
        assert!(locations.contains(&history_src.as_str()), "{locations:?}");
    }

    #[test]
    fn diff_parsing_tracks_hunks_and_content_that_looks_like_headers() {
        let matcher = Matcher::new(&["kg".to_owned()]).unwrap();
        let (a, b, c) = (token(), token(), token());
        let log = format!(
            "{COMMIT_MARKER}0123456789abcdef0123456789abcdef01234567\n\
             \n\
             diff --git a/x.txt b/x.txt\n\
             index 1..2 100644\n\
             --- a/x.txt\n\
             +++ b/x.txt\n\
             @@ -3,2 +3 @@ fn context()\n\
             -old\n\
             -{c}\n\
             +++ {a}\n\
             @@ -10 +9,0 @@\n\
             -gone\n\
             @@ -20,0 +19,2 @@\n\
             +first\n\
             +x {b}\n\
             \\ No newline at end of file\n\
             diff --git a/y b/y\n\
             deleted file mode 100644\n\
             --- a/y\n\
             +++ /dev/null\n\
             @@ -1 +0,0 @@\n\
             -{c}\n\
             {COMMIT_MARKER}fedcba9876543210fedcba9876543210fedcba98\n\
             \n\
             diff --git \"a/t\\tab\" \"b/t\\tab\"\n\
             --- /dev/null\n\
             +++ \"b/t\\tab\"\n\
             @@ -0,0 +1 @@\n\
             +{c}\n"
        );
        let mut out = Findings::default();
        parse_log(&matcher, log.as_bytes(), "", &ProgressBar::hidden(), &mut out).unwrap();
        let got: Vec<(&str, &str)> = out.list.iter().map(|f| (f.location.as_str(), f.token.expose())).collect();
        assert_eq!(
            got,
            vec![
                ("commit 0123456789ab x.txt:3", a.as_str()),
                ("commit 0123456789ab x.txt:20", b.as_str()),
                ("commit fedcba987654 t\tab:1", c.as_str()),
            ]
        );
    }

    #[test]
    fn hunk_headers_and_quoted_paths_parse() {
        assert_eq!(hunk_header("@@ -1,2 +3,4 @@"), Some((2, 3, 4)));
        assert_eq!(hunk_header("@@ -0,0 +1 @@ x"), Some((0, 1, 1)));
        assert_eq!(hunk_header("@@ -5 +4,0 @@"), Some((1, 4, 0)));
        assert_eq!(hunk_header("@@ garbage"), None);
        assert_eq!(unquote(r#""b/caf\303\251 \"q\"""#), "b/café \"q\"");
        assert_eq!(new_side_path("b/with space.txt\t").as_deref(), Some("with space.txt"));
        assert_eq!(new_side_path("/dev/null"), None);
    }

    #[test]
    fn progress_templates_are_valid() {
        assert!(ProgressStyle::with_template(FILES_TEMPLATE).is_ok());
        assert!(ProgressStyle::with_template(HISTORY_TEMPLATE).is_ok());
    }
}
