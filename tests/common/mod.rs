//! Helpers shared by the end-to-end tests: run the vmm binary, find images.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm::ctl::request;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A guest image from guest-images/out/, or a failure saying how to build it.
pub fn image(name: &str) -> PathBuf {
    let path = repo_root().join("guest-images/out").join(name);
    assert!(path.exists(), "{} is missing: build the guest images first with guest-images/build.sh", path.display());
    path
}

pub fn resource(name: &str) -> PathBuf {
    repo_root().join("resources").join(name)
}

/// These tests need KVM; without it they fail and say so.
pub fn require_kvm() {
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
    if let Err(e) = kvm {
        panic!("this test needs read-write access to /dev/kvm (run as root on a KVM host): {e}");
    }
}

pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn describe(&self) -> String {
        format!(
            "exit code {:?} after {:.1} s\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code,
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }
}

pub fn vmm(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Runs vmm to completion, killing it (and failing) if it outlives `limit`.
pub fn run_vmm(args: &[&str], limit: Duration) -> Outcome {
    let child = vmm(args).spawn().expect("cannot start the vmm binary");
    wait_with_limit(child, limit)
}

fn read_all<R: Read + Send + 'static>(mut pipe: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = pipe.read_to_string(&mut s);
        s
    })
}

pub fn wait_with_limit(mut child: Child, limit: Duration) -> Outcome {
    let start = Instant::now();
    let out_reader = read_all(child.stdout.take().unwrap());
    let err_reader = read_all(child.stderr.take().unwrap());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let (stdout, stderr) = (out_reader.join().unwrap(), err_reader.join().unwrap());
            panic!(
                "vmm hung: still running after {} s\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Outcome {
        code: status.code(),
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
        elapsed: start.elapsed(),
    }
}

/// Runs memtest guests: `vmm run --kernel <memtest> ARGS...`.
pub fn run_memtest(args: &[&str]) -> Outcome {
    require_kvm();
    let memtest = image("memtest");
    let mut all = vec!["run", "--kernel", memtest.to_str().unwrap()];
    all.extend_from_slice(args);
    run_vmm(&all, Duration::from_secs(300))
}

/// Boots `guests` tiny-linux guests of 128 MiB, consoles in `consoles`,
/// stopping them after 200 s per guest plus 200 (on PVM hosts one boot
/// takes about 90 s of emulated kernel code, and the guests share two
/// cores); `extra` goes at the end of the command line.
pub fn run_tiny_linux(guests: &str, consoles: &Path, extra: &[&str]) -> Outcome {
    let timeout = 200 * guests.parse::<u64>().unwrap() + 200;
    let mut args = tiny_linux_args(guests, consoles, timeout);
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_vmm(&args, Duration::from_secs(timeout + 80))
}

/// `vmm run` of `guests` tiny-linux guests of 128 MiB, consoles in
/// `consoles`, stopped after `timeout` seconds; more flags may follow.
pub fn tiny_linux_args(guests: &str, consoles: &Path, timeout: u64) -> Vec<String> {
    require_kvm();
    let dir = image("tiny-linux");
    let (kernel, initrd) = (dir.join("vmlinux"), dir.join("initramfs.cpio.gz"));
    let timeout = timeout.to_string();
    let args = [
        "run",
        "--guests",
        guests,
        "--memory",
        "128",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--console-dir",
        consoles.to_str().unwrap(),
        "--timeout",
        &timeout,
    ];
    args.map(String::from).to_vec()
}

/// A fresh, empty directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A raw disk image of `mib` MiB with an MBR holding one Linux partition
/// from 1 MiB to the end, as a partitioning tool would write it.
pub fn write_mbr_image(path: &Path, mib: u64) {
    let sectors = mib * 2048;
    let mut image = vec![0u8; (mib << 20) as usize];
    let entry = &mut image[446..462];
    entry[4] = 0x83; // Linux
    entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
    entry[12..16].copy_from_slice(&((sectors - 2048) as u32).to_le_bytes());
    image[510] = 0x55;
    image[511] = 0xaa;
    // Something to read back beyond the table.
    image[1 << 20..(1 << 20) + 16].copy_from_slice(b"VMM-DISK-CONTENT");
    std::fs::write(path, image).unwrap();
}

/// A GPT disk image `name` in `dir` whose Linux partition holds an ext4
/// file system made from `files` (path, contents), after an EFI system
/// partition if `efi`, made with the usual tools (sfdisk, mkfs.ext4).
/// Returns its path.
pub fn gpt_image(dir: &Path, name: &str, files: &[(&str, &[u8])], efi: bool) -> PathBuf {
    let (root, mib) = file_tree(dir, name, files);
    let fs = dir.join(format!("{name}.ext4"));
    let made = Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(&root).arg(&fs).arg(format!("{mib}M")).status();
    assert!(made.expect("mkfs.ext4 (e2fsprogs) is needed").success(), "mkfs.ext4 failed");
    gpt_around(dir, name, &fs, mib, if efi { &["U", "L"] } else { &["L"] })
}

/// A GPT disk image `name` in `dir` with one EFI system partition whose
/// FAT file system holds `files`, as systemd-boot keeps them (mkfs.vfat
/// and mtools). Returns its path.
pub fn esp_image(dir: &Path, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let (root, mib) = file_tree(dir, name, files);
    let fs = dir.join(format!("{name}.vfat"));
    let _ = std::fs::remove_file(&fs);
    let made = Command::new("mkfs.vfat").arg("-C").arg(&fs).arg((mib * 1024).to_string()).output();
    assert!(made.expect("mkfs.vfat (dosfstools) is needed").status.success(), "mkfs.vfat failed");
    for entry in std::fs::read_dir(&root).unwrap() {
        let copied = Command::new("mcopy").args(["-s", "-i"]).arg(&fs).arg(entry.unwrap().path()).arg("::/").status();
        assert!(copied.expect("mcopy (mtools) is needed").success(), "mcopy failed");
    }
    gpt_around(dir, name, &fs, mib, &["U"])
}

/// Writes `files` under a fresh directory; returns it and a size in MiB
/// that holds them with room to spare.
fn file_tree(dir: &Path, name: &str, files: &[(&str, &[u8])]) -> (PathBuf, usize) {
    let root = dir.join(format!("{name}-root"));
    std::fs::create_dir_all(&root).unwrap();
    for (path, contents) in files {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }
    let bytes: usize = files.iter().map(|(_, c)| c.len()).sum();
    (root, (bytes >> 20) + 8)
}

/// A GPT disk image with partitions of `types` (sfdisk's names), the last
/// `mib` MiB and holding the file system image `fs`, the others 1 MiB.
fn gpt_around(dir: &Path, name: &str, fs: &Path, mib: usize, types: &[&str]) -> PathBuf {
    let disk = dir.join(format!("{name}.img"));
    std::fs::File::create(&disk).unwrap().set_len(((mib + types.len() + 2) << 20) as u64).unwrap();
    let (last, before) = types.split_last().unwrap();
    let mut script = String::from("label: gpt\n");
    for kind in before {
        script += &format!("size=1MiB, type={kind}\n");
    }
    script += &format!("size={mib}MiB, type={last}\n");
    let mut sfdisk = Command::new("sfdisk")
        .arg("--quiet")
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk (Debian's fdisk package) is needed");
    std::io::Write::write_all(sfdisk.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
    assert!(sfdisk.wait().unwrap().success(), "sfdisk failed");
    // Where sfdisk put the last partition: the last line of its dump.
    let dump = Command::new("sfdisk").arg("-d").arg(&disk).output().unwrap();
    let dump = String::from_utf8(dump.stdout).unwrap();
    let start: u64 = dump
        .lines()
        .filter_map(|l| l.split("start=").nth(1))
        .next_back()
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no partition in sfdisk's dump:\n{dump}"));
    let bytes = std::fs::read(fs).unwrap();
    let out = std::fs::File::options().write(true).open(&disk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&out, &bytes, start * 512).unwrap();
    disk
}

/// A `vmm serve` child, stopped with SIGINT when dropped.
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
}

impl Server {
    pub fn start(name: &str) -> Server {
        Self::start_with(name, &[])
    }

    /// `vmm serve` with `extra` flags.
    pub fn start_with(name: &str, extra: &[&str]) -> Server {
        require_kvm();
        let socket = scratch_dir(name).join("api.sock");
        let mut args = vec!["serve", "--api-socket", socket.to_str().unwrap()];
        args.extend_from_slice(extra);
        Self::spawn(vmm(&args), socket)
    }

    /// Starts `command`, a `vmm serve` on `socket`, and waits for its API.
    pub fn spawn(mut command: Command, socket: PathBuf) -> Server {
        let child = command.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "the server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, socket }
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, text) = request(&self.socket, method, path, body.as_ref()).unwrap();
        (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) })
    }

    pub fn raw(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        let _ = s.write_all(body.as_bytes());
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        let (head, text) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, serde_json::from_str(text).unwrap_or(Value::Null))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A memtest guest of 64 MiB for `POST /guests`.
pub fn memtest_guest(cmdline: &str) -> Value {
    serde_json::json!({"kernel": image("memtest"), "memory_mib": 64, "cmdline": cmdline})
}

/// Creates and starts a guest through the API; returns its id.
pub fn create_and_start(server: &Server, spec: Value) -> u64 {
    let (status, g) = server.call("POST", "/guests", Some(spec));
    assert_eq!(status, 201, "{g}");
    let id = g["id"].as_u64().unwrap();
    let (status, g) = server.call("POST", &format!("/guests/{id}/start"), None);
    assert_eq!(status, 200, "{g}");
    id
}

/// `GET /guests/{id}`.
pub fn guest(server: &Server, id: u64) -> Value {
    server.call("GET", &format!("/guests/{id}"), None).1
}

/// Rounds memtest has verified on guest `id`, from its console.
pub fn rounds(server: &Server, id: u64) -> usize {
    let (_, c) = server.call("GET", &format!("/guests/{id}/console"), None);
    c["tail"].as_str().unwrap_or_default().matches(" ok\n").count()
}
