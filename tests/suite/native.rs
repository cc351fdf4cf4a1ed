//! Native sampling: known call chains appear root to leaf in the folded output.

use profiler::symbolize::TRUNCATED_FRAME;
use profiler_tests::*;

/// The chain main -> chain_outer -> chain_middle -> chain_inner -> spin_leaf of a
/// frame-pointer program appears root to leaf under its process name, and nothing
/// is lost.
#[test]
fn known_chain_appears_root_to_leaf() {
    let target = start("chain", &["4"]);
    settle();
    let out = tempfile::tempdir().unwrap();
    let summary = record(&[target.pid()], 2, 97, out.path());
    let stacks = read_folded(out.path());
    let chain = CHAIN_ROOT_FIRST;
    let hits = samples_with_chain(&stacks, "chain", &chain);
    let total: u64 = stacks.iter().map(|s| s.count).sum();
    assert!(
        hits * 2 > total,
        "chain in {hits} of {total} samples: {stacks:#?}"
    );
    assert_eq!(summary.lost(), 0);
    assert_eq!(
        summary.records,
        summary.kernel.get(profiler_common::Counter::Emitted)
    );
}

/// A syscall-heavy program shows named kernel frames (`_[k]`) under its user frames.
#[test]
fn kernel_frames_under_user_frames() {
    let target = start("syscalls", &["4"]);
    settle();
    let out = tempfile::tempdir().unwrap();
    record(&[target.pid()], 2, 97, out.path());
    let stacks = read_folded(out.path());
    let with_kernel: Vec<&FoldedStack> = stacks
        .iter()
        .filter(|s| contains_chain(&s.frames, &["main", "read_zero_loop"]))
        .filter(|s| {
            let last = s.frames.last().unwrap();
            last.ends_with("_[k]") && !last.starts_with("[unknown]")
        })
        .collect();
    assert!(!with_kernel.is_empty(), "no user+kernel stack: {stacks:#?}");
    for s in &with_kernel {
        // Once a kernel frame starts, the rest of the stack is kernel.
        let first_k = s.frames.iter().position(|f| f.ends_with("_[k]")).unwrap();
        assert!(
            s.frames[first_k..].iter().all(|f| f.ends_with("_[k]")),
            "{s:?}"
        );
        assert!(
            s.frames[..first_k].iter().all(|f| !f.ends_with("_[k]")),
            "{s:?}"
        );
    }
    // The kernel frames alone (user frames such as read_zero_loop would match
    // "read" too): the read syscall's own functions, every frame named.
    let kernel_names: Vec<&str> = with_kernel
        .iter()
        .flat_map(|s| &s.frames)
        .filter_map(|f| f.strip_suffix("_[k]"))
        .collect();
    assert!(
        kernel_names.iter().any(|f| [
            "vfs_read",
            "ksys_read",
            "__x64_sys_read",
            "__arm64_sys_read"
        ]
        .contains(f)),
        "no kernel frame of the read syscall in {with_kernel:#?}"
    );
    let unnamed = kernel_names
        .iter()
        .filter(|f| f.starts_with("[unknown]"))
        .count();
    assert_eq!(unnamed, 0, "unnamed kernel frames in {with_kernel:#?}");
}

/// A process that execs another program keeps its pid and start time: the agent
/// notices the new executable at the end of an interval, so later profiles name the
/// new program and its functions, not the shell it replaced.
#[test]
fn agent_notices_exec() {
    let _cpu = cpu_heavy_lock();
    let dir = tempfile::tempdir().unwrap();
    // bash spins as itself (so it is captured as bash) until told, then becomes chain.
    let go = dir.path().join("go");
    let script = format!(
        "while [ ! -e {} ]; do :; done; exec {} 30",
        go.display(),
        program("chain").display()
    );
    let target = KillOnDrop::spawn(std::process::Command::new("bash").args(["-c", &script]));
    let pid = target.pid().to_string();
    let mut agent = Agent::start(&[
        "--interval",
        "2",
        "--pid",
        &pid,
        "--output-dir",
        dir.path().join("profiles").to_str().unwrap(),
    ]);
    agent.wait_for_log("profiling started", std::time::Duration::from_secs(30));
    std::thread::sleep(std::time::Duration::from_secs(3));
    std::fs::write(&go, "").unwrap();
    std::thread::sleep(std::time::Duration::from_secs(8));
    assert!(
        agent
            .terminate(std::time::Duration::from_secs(20))
            .unwrap()
            .success(),
        "{}",
        agent.log()
    );
    let folded = folded_files(&dir.path().join("profiles"));
    let stacks: Vec<FoldedStack> = folded.iter().flat_map(|p| read_folded_file(p)).collect();
    let as_bash: u64 = stacks
        .iter()
        .filter(|s| s.frames[0] == "bash")
        .map(|s| s.count)
        .sum();
    assert!(as_bash > 0, "the shell was never sampled: {folded:?}");
    // The last two profiles come well after the exec and its interval's end.
    let late: Vec<FoldedStack> = folded
        .iter()
        .rev()
        .take(2)
        .flat_map(|p| read_folded_file(p))
        .collect();
    let named = samples_with_chain(&late, "chain", &CHAIN_ROOT_FIRST);
    let total: u64 = late.iter().map(|s| s.count).sum();
    assert!(
        named * 2 > total,
        "{named} of {total} late samples show chain's functions:\n{:?}",
        late.iter().take(5).collect::<Vec<_>>()
    );
}

/// A program that starts after recording began and exits before it ends is still
/// named: its binary was captured on first sight.
#[test]
fn exited_process_is_still_named() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_path_buf();
    let recorder = std::thread::spawn(move || record(&[], 4, 97, &dir));
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let mut target = KillOnDrop::spawn(
        std::process::Command::new(program_named("chain", "chain_exits")).arg("1.5"),
    );
    assert!(target.wait().success());
    recorder.join().unwrap();
    let stacks = read_folded(out.path());
    let ours: Vec<&FoldedStack> = stacks
        .iter()
        .filter(|s| s.frames[0] == "chain_exits")
        .collect();
    let chain = CHAIN_ROOT_FIRST;
    let hits = samples_with_chain(&stacks, "chain_exits", &chain);
    let total: u64 = ours.iter().map(|s| s.count).sum();
    assert!(hits * 2 > total, "exited program not named: {ours:#?}");
    assert!(
        ours.iter()
            .all(|s| s.frames.iter().all(|f| !f.contains("[unknown process]"))),
        "{ours:#?}"
    );
}

/// Children forked without an exec that exit within 30 ms, long before their
/// mappings could be read, are named from their parent's, which they shared: the
/// eBPF fork tracker told the reader who forked them.
#[test]
fn short_lived_forked_children_are_named_from_their_parent() {
    let target = start("forker", &["5", "30"]);
    settle();
    let out = tempfile::tempdir().unwrap();
    let summary = record(&[], 3, 97, out.path());
    drop(target);
    let stacks = read_folded(out.path());
    let ours: Vec<&FoldedStack> = stacks.iter().filter(|s| s.frames[0] == "forker").collect();
    let total: u64 = ours.iter().map(|s| s.count).sum();
    let named = samples_with_chain(&stacks, "forker", &["fork_work", "fork_leaf"]);
    // Nearly all samples are of children (the parent waits); before the fork
    // tracker, ~1 in 8 was named here.
    assert!(
        named * 10 > total * 8,
        "{named} of {total} named: {ours:#?}"
    );
    assert!(summary.named_from_parent > 0, "{}", summary.render());
}

/// Children that exec a program no other process maps and exit within 10 ms,
/// before their /proc entries could be read, are named all the same: the eBPF
/// program read their mappings while they were young, and the exec event gave
/// the program's path.
#[test]
fn short_lived_execd_children_are_named_from_the_kernels_mappings() {
    let child = program_named("execer", "execed_child");
    let target = start("execer", &["5", "10", child.to_str().unwrap()]);
    settle();
    let out = tempfile::tempdir().unwrap();
    let summary = record(&[], 3, 97, out.path());
    drop(target);
    let stacks = read_folded(out.path());
    let ours: Vec<&FoldedStack> = stacks
        .iter()
        .filter(|s| s.frames[0] == "execed_child")
        .collect();
    let total: u64 = ours.iter().map(|s| s.count).sum();
    let named = samples_with_chain(&stacks, "execed_child", &["main", "exec_work", "exec_leaf"]);
    // The rest are in exec, the dynamic loader and exit. Measured here: ~95 %
    // named; before the kernel read the mappings, 9 of 282.
    assert!(named * 4 > total * 3, "{named} of {total} named: {ours:#?}");
    assert!(summary.named_from_kernel > 0, "{}", summary.render());
}

/// What a child ran between its fork and its exec is named from its parent's
/// program, though by the time the child is read from /proc (~0.5 s later) it runs
/// another one: the drain marked those samples, which arrive before the exec event.
/// Before, they were looked up in the exec'd program's mappings, where the
/// parent's addresses are `[unmapped]`.
#[test]
fn work_before_an_exec_is_named_from_the_parent() {
    let parent = program_named("execer", "pre_execer");
    let child = program_named("execer", "post_exec");
    // Each child: 150 ms in pre_exec_work, then exec, then 700 ms alive (captured).
    profiler_bin();
    let target = KillOnDrop::spawn(std::process::Command::new(&parent).args([
        "5",
        "700",
        child.to_str().unwrap(),
        "150",
    ]));
    settle();
    let out = tempfile::tempdir().unwrap();
    let summary = record(&[], 3, 97, out.path());
    drop(target);
    let stacks = read_folded(out.path());
    let chain = ["main", "pre_exec_work", "pre_exec_leaf"];
    // Rooted at the child's name once it was read after its exec, or at the
    // parent's if the read came first.
    let named: u64 = ["post_exec", "pre_execer"]
        .iter()
        .map(|root| samples_with_chain(&stacks, root, &chain))
        .sum();
    let unmapped: u64 = stacks
        .iter()
        .filter(|s| s.frames[0] == "post_exec")
        .filter(|s| s.frames.iter().any(|f| f.contains("[unmapped]")))
        .map(|s| s.count)
        .sum();
    let ours: Vec<&FoldedStack> = stacks
        .iter()
        .filter(|s| ["post_exec", "pre_execer"].contains(&s.frames[0].as_str()))
        .collect();
    // ~3 children x 150 ms at 97 Hz: ~45 samples before their exec. Measured
    // here: 43 named and 0 unmapped; without the marking, 15 and 28.
    assert!(named >= 25, "{named} named, {unmapped} unmapped: {ours:#?}");
    assert!(
        named > 4 * unmapped,
        "{named} named, {unmapped} unmapped: {ours:#?}"
    );
    assert!(summary.named_before_exec > 0, "{}", summary.render());
}

/// The stacks that end in `deep_leaf`, recorded from tests/programs/deep.c run
/// with `args` after its duration.
fn deep_leaf_stacks(args: &[&str]) -> Vec<Vec<String>> {
    let target = start("deep", &[&["4"], args].concat());
    settle();
    let out = tempfile::tempdir().unwrap();
    record(&[target.pid()], 2, 97, out.path());
    read_folded(out.path())
        .into_iter()
        .filter(|s| s.frames.last().map(String::as_str) == Some("deep_leaf"))
        .map(|s| s.frames)
        .collect()
}

/// A 60-deep recursion is recorded with every frame, and nothing marks it cut.
#[test]
fn deep_stack_is_complete() {
    let stacks = deep_leaf_stacks(&["60"]);
    let deepest = stacks
        .iter()
        .map(|frames| frames.iter().filter(|f| *f == "recurse").count())
        .max();
    assert_eq!(deepest, Some(61), "{stacks:#?}");
    assert!(
        stacks.iter().flatten().all(|f| f != TRUNCATED_FRAME),
        "{stacks:#?}"
    );
}

/// Frames 1.5 KiB apart, more than the eBPF walk reads from the stack at once
/// (each caller's frame needs a read of its own, some across a page boundary),
/// are all walked: the 20-deep recursion arrives whole, under `main`.
#[test]
fn frames_farther_apart_than_one_stack_read_are_all_walked() {
    let stacks = deep_leaf_stacks(&["20", "wide"]);
    let whole = stacks.iter().any(|frames| {
        frames.iter().filter(|f| *f == "recurse_wide").count() == 21
            && frames.iter().any(|f| f == "main")
    });
    assert!(whole, "{stacks:#?}");
}

/// A recursion deeper than the walk's limit keeps the innermost MAX_STACK_DEPTH (127)
/// user frames (a sample of user code, which the program writes into the smaller
/// user-only slot, has room for all of them), under a `[truncated]` frame right
/// below the process, so cut stacks do not pose as roots; the summary counts them.
#[test]
fn stack_past_the_limit_keeps_127_frames_under_a_truncated_frame() {
    let target = start("deep", &["4", "200"]);
    settle();
    let out = tempfile::tempdir().unwrap();
    let summary = record(&[target.pid()], 2, 97, out.path());
    let stacks: Vec<Vec<String>> = read_folded(out.path())
        .into_iter()
        .filter(|s| s.frames.last().map(String::as_str) == Some("deep_leaf"))
        .map(|s| s.frames)
        .collect();
    let text = summary.render();
    assert!(!stacks.is_empty(), "{text}");
    for frames in &stacks {
        // Process name, the marker, then the 127 innermost frames.
        assert_eq!(frames[1], TRUNCATED_FRAME, "{frames:#?}");
        assert_eq!(
            frames.len() - 2,
            profiler_common::MAX_STACK_DEPTH,
            "{frames:#?}"
        );
    }
    // Every deep_leaf sample is cut; the count covers them (and any other).
    let cut: u64 = read_folded(out.path())
        .iter()
        .filter(|s| s.frames.get(1).map(String::as_str) == Some(TRUNCATED_FRAME))
        .map(|s| s.count)
        .sum();
    assert_eq!(summary.stacks_at_depth_limit, cut, "{text}");
    assert!(text.contains("stacks deeper than 127 frames:"), "{text}");
}

/// Removes a file when dropped (the debug file a test installs system-wide).
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A stripped binary whose DWARF lives in a separate debug file under
/// /usr/lib/debug/.build-id (what `apt install foo-dbgsym` gives) is named from that
/// file: its functions, source file and lines, which the binary itself no longer has.
#[test]
fn stripped_binary_is_named_from_its_debug_file() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("stripped_chain");
    // A build id of our own, so the debug file cannot match any other binary.
    let build_id = format!("{:032x}{:08x}", rand_u128(), std::process::id());
    let run = |cmd: &mut std::process::Command| {
        let status = cmd.status().expect("gcc and binutils are installed");
        assert!(status.success(), "{cmd:?}");
    };
    run(std::process::Command::new("gcc")
        .args(["-O0", "-g", "-fno-omit-frame-pointer"])
        .arg(format!("-Wl,--build-id=0x{build_id}"))
        .arg("-o")
        .arg(&exe)
        .arg(crate_dir().join("programs/chain.c")));
    let debug = std::path::PathBuf::from(format!(
        "/usr/lib/debug/.build-id/{}/{}.debug",
        &build_id[..2],
        &build_id[2..]
    ));
    std::fs::create_dir_all(debug.parent().unwrap()).unwrap();
    let _installed = RemoveOnDrop(debug.clone());
    run(std::process::Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(&exe)
        .arg(&debug));
    run(std::process::Command::new("strip")
        .arg("--strip-all")
        .arg(&exe));
    run(std::process::Command::new("objcopy")
        .arg(format!("--add-gnu-debuglink={}", debug.display()))
        .arg(&exe));
    let symbols = std::process::Command::new("nm").arg(&exe).output().unwrap();
    assert!(
        String::from_utf8_lossy(&symbols.stderr).contains("no symbols"),
        "the binary still has symbols"
    );

    let target = KillOnDrop::spawn(std::process::Command::new(&exe).arg("4"));
    settle();
    let out = tempfile::tempdir().unwrap();
    record(&[target.pid()], 2, 97, out.path());
    let chain = CHAIN_ROOT_FIRST;
    let stacks = read_folded(out.path());
    let hits = samples_with_chain(&stacks, "stripped_chain", &chain);
    let total: u64 = stacks.iter().map(|s| s.count).sum();
    assert!(hits * 2 > total, "chain in {hits} of {total}: {stacks:#?}");

    // Source lines come from the debug file's DWARF.
    let p = read_pprof(out.path());
    let s = |i: i64| p.string_table[i as usize].as_str();
    let leaf = p
        .function
        .iter()
        .find(|f| s(f.name) == "spin_leaf")
        .expect("spin_leaf in pprof");
    assert!(
        s(leaf.filename).ends_with("chain.c"),
        "{}",
        s(leaf.filename)
    );
    assert!(p
        .location
        .iter()
        .flat_map(|l| &l.line)
        .any(|l| l.function_id == leaf.id && l.line > 0));
}

/// A frame with inlined functions gets each function's own source line: the
/// innermost where the sampled instruction is, each caller where it calls the next
/// (tests/programs/inlined.c marks those lines).
#[test]
fn inlined_functions_get_their_own_lines() {
    let source = std::fs::read_to_string(crate_dir().join("programs/inlined.c")).unwrap();
    let line_of = |marker: &str| {
        source
            .lines()
            .position(|l| l.contains(&format!("/* {marker} */")))
            .expect(marker) as i64
            + 1
    };
    let want = [
        ("inl_inner", line_of("LINE_INNER")),
        ("inl_middle", line_of("LINE_MIDDLE")),
        ("inl_outer", line_of("LINE_OUTER")),
    ];
    let target = start("inlined", &["4"]);
    settle();
    let out = tempfile::tempdir().unwrap();
    record(&[target.pid()], 2, 97, out.path());
    let p = read_pprof(out.path());
    let s = |i: i64| p.string_table[i as usize].as_str();
    let name = |id: u64| s(p.function.iter().find(|f| f.id == id).unwrap().name);
    // Samples at each (function, line) of locations holding the inlined chain.
    let mut seen: std::collections::HashMap<(String, i64), i64> = Default::default();
    let mut chained = 0;
    for sample in &p.sample {
        let loc = &p.location[sample.location_id[0] as usize - 1];
        let names: Vec<&str> = loc.line.iter().map(|l| name(l.function_id)).collect();
        if names != ["inl_inner", "inl_middle", "inl_outer"] {
            continue;
        }
        chained += sample.value[0];
        for l in &loc.line {
            *seen
                .entry((name(l.function_id).to_string(), l.line))
                .or_default() += sample.value[0];
        }
    }
    assert!(
        chained > 50,
        "{chained} samples in the inlined chain: {seen:?}"
    );
    for (function, line) in want {
        let at_line = seen
            .get(&(function.to_string(), line))
            .copied()
            .unwrap_or(0);
        assert!(
            at_line * 10 >= chained * 9,
            "{function}: {at_line} of {chained} samples at line {line}: {seen:?}"
        );
    }
}

/// A user stack walk that meets a frame pointer it cannot follow (misaligned, as
/// code without frame pointers may leave) stops there and is counted; the sample
/// keeps the frame it had.
#[test]
fn user_walk_cut_at_a_bad_frame_pointer_is_counted() {
    let target = start("badfp", &["4"]);
    settle();
    let out = tempfile::tempdir().unwrap();
    let summary = record(&[target.pid()], 2, 97, out.path());
    let cut = summary.kernel.get(profiler_common::Counter::UserWalkCut);
    let stacks = read_folded(out.path());
    let leaf: u64 = stacks
        .iter()
        .filter(|s| s.frames.last().is_some_and(|f| f == "spin_bad_fp"))
        .map(|s| s.count)
        .sum();
    assert!(leaf > 50, "{leaf} samples in spin_bad_fp: {stacks:#?}");
    assert!(
        cut >= leaf,
        "{cut} walks counted as cut, {leaf} samples in the loop"
    );
    assert!(
        summary.render().contains("could not follow"),
        "{}",
        summary.render()
    );
}

/// Every timer event the kernel fires reaches the program: over 2 s at 97 Hz the
/// events the program counted (each ends in exactly one outcome, idle and
/// filtered-out ones included) are those the frequency, the online CPUs and the
/// attached time predict, within the tolerance of attach and detach (events a CPU's
/// idle time explains reckoned apart), and the summary says so. A wrong formula
/// (one CPU, milliseconds) is off by far more.
#[test]
fn kernel_delivers_every_expected_timer_event() {
    let _cpu = cpu_heavy_lock();
    let (summary, d, text) = record_a_spinner(None);
    eprintln!(
        "expected {}, delivered {}, runs {:?}, tolerance {}, over {:.3} s",
        d.expected,
        d.delivered,
        d.runs,
        d.tolerance(),
        summary.elapsed.as_secs_f64()
    );
    // The expectation itself, from figures the sampler did not give: the CPUs
    // online, and the 2 s the program was attached for at least and the whole
    // recording (load to drain) it was attached for at most.
    // SAFETY: a plain libc call.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } as u64;
    assert_eq!(d.cpus as u64, cpus, "{text}");
    let at_least = 97 * cpus * 2;
    let at_most = (97.0 * cpus as f64 * summary.elapsed.as_secs_f64()).ceil() as u64;
    assert!(
        (at_least..=at_most).contains(&d.expected),
        "expected {} events, not within {at_least}..={at_most}:\n{text}",
        d.expected
    );
    // Every event expected while a CPU was busy came; those that did not come
    // while one was idle (a kernel that does not fire the timer on an idle CPU) are
    // reckoned apart; and no more came than expected.
    assert!(
        !d.short() && d.delivered <= d.expected + d.tolerance(),
        "delivered {} of {} expected events, {} missing while busy, {} while idle (tolerance {}):\n{text}",
        d.delivered,
        d.expected,
        d.missing(),
        d.missed_while_idle(),
        d.tolerance()
    );
    // record turns the kernel's BPF statistics on: its count of runs is the
    // program's count of outcomes.
    if let Some(runs) = d.runs {
        assert_eq!(runs, d.delivered, "{text}");
    }
    assert!(
        text.contains("  kernel delivered ") && text.contains(" expected timer events ("),
        "{text}"
    );
    assert!(!text.contains("never reached the eBPF program"), "{text}");
}

/// Records 2 s at 97 Hz of a one-thread spinner (pinned to CPU `pin`, if given):
/// the summary, its delivery figures and its text.
fn record_a_spinner(
    pin: Option<usize>,
) -> (
    profiler::record::RecordSummary,
    profiler::delivery::Delivery,
    String,
) {
    let target = start("chain", &["4"]);
    if let Some(cpu) = pin {
        // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity on it.
        let pinned = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(
                target.pid() as i32,
                std::mem::size_of::<libc::cpu_set_t>(),
                &set,
            )
        };
        assert_eq!(pinned, 0, "cannot pin the target to CPU {cpu}");
    }
    settle();
    let out = tempfile::tempdir().unwrap();
    let summary = record(&[target.pid()], 2, 97, out.path());
    let (d, text) = (summary.delivery, summary.render());
    (summary, d, text)
}

/// Events that did not come while a CPU was idle are no shortfall: with one CPU
/// busy and the others idle, nothing is reported missing, and on a kernel that
/// does not fire the timer on an idle CPU (this project's VMs, for every CPU but
/// the first) the summary says why the count is short and that nothing is lost.
#[test]
fn events_missed_on_idle_cpus_are_no_shortfall() {
    let _cpu = cpu_heavy_lock();
    let (_, d, text) = record_a_spinner(Some(0));
    eprintln!(
        "expected {} ({} in idle time), delivered {} ({} of the idle task), missing {} while busy, {} while idle, tolerance {}",
        d.expected,
        d.expected_idle,
        d.delivered,
        d.delivered_idle,
        d.missing(),
        d.missed_while_idle(),
        d.tolerance()
    );
    assert!(!d.short(), "{d:?}\n{text}");
    assert!(!text.contains("never reached the eBPF program"), "{text}");
    if d.missed_while_idle() > d.tolerance() {
        assert!(
            text.contains("did not come while CPUs were idle") && text.contains("nothing is lost"),
            "{text}"
        );
    }
}

/// 128 random bits from the kernel.
fn rand_u128() -> u128 {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").unwrap(),
        &mut bytes,
    )
    .unwrap();
    u128::from_le_bytes(bytes)
}

/// Samples of `leaf` (its last frame) by their `thread` label.
fn threads_of(p: &proto::Profile, leaf: &str) -> std::collections::BTreeMap<String, i64> {
    let mut by_thread = std::collections::BTreeMap::new();
    for sample in pprof_stacks(p) {
        if sample.frames.last().map(String::as_str) == Some(leaf) {
            let thread = sample
                .labels
                .iter()
                .find(|(k, _)| k == "thread")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            *by_thread.entry(thread).or_insert(0) += sample.count;
        }
    }
    by_thread
}

/// Two threads taking turns on one CPU keep their own names in every sample,
/// though the sampler reads a thread's name only when the CPU's thread changes.
#[test]
fn threads_sharing_a_cpu_keep_their_names() {
    let _cpu = cpu_heavy_lock();
    let target = start("threads", &["4"]);
    settle();
    let out = tempfile::tempdir().unwrap();
    let summary = record(&[target.pid()], 2, 97, out.path());
    assert_eq!(summary.malformed, 0);
    let p = read_pprof(out.path());
    let alpha = threads_of(&p, "alpha_leaf");
    let beta = threads_of(&p, "beta_leaf");
    assert_eq!(
        alpha.keys().collect::<Vec<_>>(),
        ["alpha_thread"],
        "{alpha:?}"
    );
    assert_eq!(beta.keys().collect::<Vec<_>>(), ["beta_thread"], "{beta:?}");
    // Both ran: each had some of the one CPU's ~190 samples.
    assert!(
        alpha["alpha_thread"] >= 20 && beta["beta_thread"] >= 20,
        "{alpha:?} {beta:?}"
    );
}

/// A thread that renames itself while it keeps its CPU is named anew within
/// `COMM_READ_EVERY` samples of each CPU it runs on.
#[test]
fn renamed_thread_is_named_anew() {
    let _cpu = cpu_heavy_lock();
    let target = start("threads", &["3", "rename"]);
    let out = tempfile::tempdir().unwrap();
    let summary = record(&[target.pid()], 3, 97, out.path());
    assert_eq!(summary.malformed, 0);
    let p = read_pprof(out.path());
    let after = threads_of(&p, "after_leaf");
    let stale = after.get("before").copied().unwrap_or(0);
    let cpus = std::thread::available_parallelism().unwrap().get() as i64;
    assert!(
        stale <= profiler_common::COMM_READ_EVERY as i64 * cpus,
        "{after:?}"
    );
    assert!(after.get("after").copied().unwrap_or(0) >= 30, "{after:?}");
    assert_eq!(
        threads_of(&p, "before_leaf").keys().collect::<Vec<_>>(),
        ["before"]
    );
}
