//! `vmm ctl`: the API's client. One HTTP/1.1 request per call over the Unix
//! socket; tables for people, `--json` for scripts.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// One request; returns (status, body).
pub fn request(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, String), String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body.as_bytes())).map_err(|e| e.to_string())?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).map_err(|e| format!("no reply from {}: {e}", socket.display()))?;
    parse_response(&reply)
}

fn parse_response(reply: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(reply);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("malformed HTTP reply")?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("malformed HTTP status line")?;
    let chunked = head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding: chunked"));
    Ok((status, if chunked { dechunk(body) } else { body.to_string() }))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out += &rest[..n];
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// The server's socket (before or after the command).
    #[arg(long, value_name = "PATH", global = true)]
    pub api_socket: Option<PathBuf>,
    /// Print the API's JSON instead of a table (before or after the command).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum CtlCommand {
    /// List guests.
    List,
    /// Create a guest (it starts with `start`).
    Create(Box<CreateArgs>),
    Start {
        id: usize,
    },
    /// Park a guest's vCPUs; its memory stays mapped and mergeable.
    Pause {
        id: usize,
    },
    Resume {
        id: usize,
    },
    Stop {
        id: usize,
    },
    Delete {
        id: usize,
    },
    /// Merge what can be merged in one guest now.
    Merge {
        id: usize,
    },
    /// Ask a guest to give MIB MiB of memory back through its balloon
    /// (0: take it all back); the guest needs --balloon and its driver.
    Balloon {
        id: usize,
        mib: u64,
    },
    /// The tail of a guest's console.
    Console {
        id: usize,
    },
    /// Write a paused guest to a new directory (restore it with `create
    /// --restore DIR` or `vmm run --restore DIR`).
    Snapshot {
        id: usize,
        dir: PathBuf,
    },
    /// Page-sharing counters: global, per guest and per group.
    Stats,
    /// Show page-sharing settings, or change them: --set scan_pages=8192.
    Config {
        #[arg(long, value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// KVM kind, vm.max_map_count, memory.
    Host,
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    #[arg(long, required_unless_present_any = ["restore", "disk"])]
    pub kernel: Option<PathBuf>,
    /// Start from this snapshot instead of booting (kernel, memory and
    /// vCPUs are the snapshot's).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "cmdline", "memory", "vcpus", "disk", "transport"])]
    pub restore: Option<PathBuf>,
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    #[arg(long)]
    pub cmdline: Option<String>,
    #[arg(long, default_value_t = crate::config::MEMORY_MIB.default)]
    pub memory: u64,
    #[arg(long, default_value_t = crate::config::VCPUS.default)]
    pub vcpus: u64,
    #[arg(long)]
    pub disk: Option<PathBuf>,
    #[arg(long)]
    pub disk_readonly: bool,
    /// As `vmm run --transport`.
    #[arg(long, value_enum)]
    pub transport: Option<crate::config::Transport>,
    /// Default: the server's --merge-group policy.
    #[arg(long)]
    pub merge_group: Option<u32>,
    #[arg(long)]
    pub dedup_opt_out: bool,
    /// As `vmm run --disk-limit`.
    #[arg(long, value_name = "SPEC")]
    pub disk_limit: Option<String>,
    /// As `vmm run --net`.
    #[arg(long, value_name = "SPEC", value_parser = crate::config::NetConfig::check_cli)]
    pub net: Option<String>,
    /// As `vmm run --vsock`.
    #[arg(long, value_name = "PATH")]
    pub vsock: Option<PathBuf>,
    #[command(flatten)]
    pub balloon: crate::cli::BalloonArgs,
}

/// Runs one `vmm ctl` command; Ok(false) when the API said no.
pub fn run(args: CtlArgs) -> Result<bool, String> {
    let socket =
        args.api_socket.as_ref().ok_or("vmm ctl needs --api-socket PATH: the socket of vmm serve or vmm run")?;
    let (method, path, body) = match &args.command {
        CtlCommand::List => ("GET", "/guests".to_string(), None),
        CtlCommand::Create(c) => {
            let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
            let config = crate::config::GuestConfig {
                kernel: c.kernel.as_ref().map(abs).unwrap_or_default(),
                restore: c.restore.as_ref().map(abs),
                initrd: c.initrd.as_ref().map(abs),
                cmdline: c.cmdline.clone(),
                memory_mib: c.memory,
                vcpus: c.vcpus,
                disk: c.disk.as_ref().map(abs),
                disk_readonly: c.disk_readonly,
                merge_group: c.merge_group,
                dedup_opt_out: c.dedup_opt_out,
                net: c.net.as_deref().map(crate::config::NetConfig::parse_cli).transpose()?,
                disk_limit: c.disk_limit.as_deref().map(crate::config::RateLimit::parse_cli).transpose()?,
                vsock: c.vsock.as_ref().map(|p| crate::config::VsockConfig { socket: abs(p), cid: None }),
                balloon: c.balloon.config(),
                transport: c.transport,
            };
            ("POST", "/guests".to_string(), Some(serde_json::to_value(config).map_err(|e| e.to_string())?))
        }
        CtlCommand::Start { id } => ("POST", format!("/guests/{id}/start"), None),
        CtlCommand::Pause { id } => ("POST", format!("/guests/{id}/pause"), None),
        CtlCommand::Resume { id } => ("POST", format!("/guests/{id}/resume"), None),
        CtlCommand::Stop { id } => ("POST", format!("/guests/{id}/stop"), None),
        CtlCommand::Delete { id } => ("DELETE", format!("/guests/{id}"), None),
        CtlCommand::Merge { id } => ("POST", format!("/guests/{id}/merge"), None),
        CtlCommand::Snapshot { id, dir } => {
            let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
            ("PUT", format!("/guests/{id}/snapshot"), Some(serde_json::json!({ "dir": dir })))
        }
        CtlCommand::Balloon { id, mib } => {
            ("PUT", format!("/guests/{id}/balloon"), Some(serde_json::json!({ "target_mib": mib })))
        }
        CtlCommand::Console { id } => ("GET", format!("/guests/{id}/console"), None),
        CtlCommand::Stats => ("GET", "/dedup/stats".to_string(), None),
        CtlCommand::Config { set } if set.is_empty() => ("GET", "/dedup/config".to_string(), None),
        CtlCommand::Config { set } => ("PATCH", "/dedup/config".to_string(), Some(parse_settings(set)?)),
        CtlCommand::Host => ("GET", "/host".to_string(), None),
    };
    let (status, text) = request(socket, method, &path, body.as_ref())?;
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if !(200..300).contains(&status) {
        let why = value["error"].as_str().map_or(text.clone(), str::to_string);
        eprintln!("vmm ctl: {status}: {why}");
        return Ok(false);
    }
    if args.json {
        println!("{}", if text.is_empty() { "{}".into() } else { text });
        return Ok(true);
    }
    match &args.command {
        CtlCommand::List => print!("{}", guest_table(value.as_array().map_or(&[][..], |v| v))),
        CtlCommand::Create(_)
        | CtlCommand::Start { .. }
        | CtlCommand::Pause { .. }
        | CtlCommand::Resume { .. }
        | CtlCommand::Stop { .. }
        | CtlCommand::Merge { .. } => {
            print!("{}", guest_table(std::slice::from_ref(&value)))
        }
        CtlCommand::Delete { id } => println!("guest {id} deleted"),
        CtlCommand::Balloon { .. } => print!("{}", key_values(&value["balloon"], "")),
        CtlCommand::Console { .. } => print!("{}", value["tail"].as_str().unwrap_or_default()),
        _ => print!("{}", key_values(&value, "")),
    }
    Ok(true)
}

/// `key=value` pairs to a JSON object: numbers and booleans as such.
fn parse_settings(pairs: &[String]) -> Result<Value, String> {
    let mut map = serde_json::Map::new();
    for pair in pairs {
        let (k, v) = pair.split_once('=').ok_or_else(|| format!("--set {pair}: expected KEY=VALUE"))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        map.insert(k.to_string(), value);
    }
    Ok(Value::Object(map))
}

fn guest_table(guests: &[Value]) -> String {
    let mut out = format!(
        "{:>4}  {:<8}  {:>7}  {:>5}  {:>6}  {:>8}  {:>6}  {}\n",
        "ID", "STATE", "MEMORY", "VCPUS", "GROUP", "MERGED", "ZERO", "KERNEL"
    );
    for g in guests {
        let s = &g["sharing"];
        out += &format!(
            "{:>4}  {:<8}  {:>7}  {:>5}  {:>6}  {:>8}  {:>6}  {}\n",
            g["id"].to_string(),
            g["state"].as_str().unwrap_or("?"),
            format!("{}M", g["spec"]["memory_mib"]),
            g["spec"]["vcpus"].to_string(),
            g["spec"]["merge_group"].to_string(),
            s["merged_pages"].as_u64().map_or("-".into(), |n| n.to_string()),
            s["zero_pages"].as_u64().map_or("-".into(), |n| n.to_string()),
            g["spec"]["kernel"].as_str().unwrap_or("?"),
        );
        if let Some(end) = g["end"].as_str() {
            out += &format!("      ended: {end}\n");
        }
    }
    out
}

/// Nested JSON as indented `key: value` lines.
fn key_values(v: &Value, indent: &str) -> String {
    let mut out = String::new();
    if let Value::Object(map) = v {
        for (k, v) in map {
            match v {
                Value::Object(_) => out += &format!("{indent}{k}:\n{}", key_values(v, &format!("{indent}  "))),
                other => out += &format!("{indent}{k}: {other}\n"),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_and_chunks_parse() {
        let (status, body) = parse_response(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((status, body.as_str()), (404, "{}"));
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap().1, "abcde");
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn socket_and_json_go_before_or_after_the_command() {
        use clap::Parser;
        for args in [
            &["vmm", "ctl", "--api-socket", "s", "--json", "list"][..],
            &["vmm", "ctl", "list", "--api-socket", "s", "--json"],
            &["vmm", "ctl", "--json", "list", "--api-socket", "s"],
        ] {
            let cli = crate::cli::Cli::try_parse_from(args).unwrap();
            let crate::cli::Command::Ctl(ctl) = cli.command else { panic!("not ctl") };
            assert_eq!((ctl.api_socket.as_deref(), ctl.json), (Some(Path::new("s")), true), "{args:?}");
        }
        let cli = crate::cli::Cli::try_parse_from(["vmm", "ctl", "list"]).unwrap();
        let crate::cli::Command::Ctl(ctl) = cli.command else { panic!("not ctl") };
        assert!(run(ctl).unwrap_err().contains("--api-socket"));
    }

    #[test]
    fn settings_become_typed_json() {
        let v = parse_settings(&["scan_pages=8192".into(), "zero_pages=false".into(), "x=abc".into()]).unwrap();
        assert_eq!(v, serde_json::json!({"scan_pages": 8192, "zero_pages": false, "x": "abc"}));
        assert!(parse_settings(&["novalue".into()]).is_err());
    }
}
