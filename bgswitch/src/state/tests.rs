use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    sync::atomic::Ordering::SeqCst,
    time::{Duration, Instant},
};

use super::{journal::line_seq, snapshot::load_snapshot, *};
use crate::{
    model::{Colour, ServiceState},
    paths,
};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bgswitch-state-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    d
}

#[test]
fn round_trip_missing_and_corrupt() {
    let d = tmpdir("rt");
    let store = LocalStore::open(&d).unwrap();
    assert_eq!(store.load().unwrap(), DesiredState::default());
    let mut s = DesiredState::default();
    s.services.insert(
        "web".into(),
        ServiceState {
            id: 3,
            active: Colour::Green,
            generation: 7,
            previous: Some(Colour::Blue),
            canary_bp: 250,
            preview: vec!["198.18.0.0/24".into()],
            watch: None,
            confirm: Some(crate::model::Confirm {
                colour: Colour::Green,
                deadline_ms: 99,
            }),
            rolled_back: None,
            flips: 1,
            rollbacks: 0,
            history: vec![],
            undo: vec![],
        },
    );
    store.save(&s).unwrap();
    assert_eq!(store.load().unwrap(), s);
    assert!(!d.join("state.json.tmp").exists());
    fs::write(store.path(), "{ not json").unwrap();
    let e = store.load().unwrap_err();
    assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("refusing to start"));
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn journal_appends_and_filters() {
    let d = tmpdir("journal");
    let store = LocalStore::open(&d).unwrap();
    assert!(store.read_journal(None).unwrap().is_empty());
    let mut st = DesiredState::default();
    let cfg = crate::config::parse(
        Path::new("t"),
        "interfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"1.1.1.1:1\"\nprotocol=\"tcp\"\nblue=[\"1.1.1.2:1\"]\ngreen=[\"1.1.1.3:1\"]\n[[service]]\nname=\"b\"\nvip=\"1.1.1.1:2\"\nprotocol=\"tcp\"\nblue=[\"1.1.1.2:2\"]\ngreen=[\"1.1.1.3:2\"]\n",
    )
    .unwrap();
    st.reconcile(cfg.service_names()).unwrap();
    let req = crate::model::Request::default();
    for name in ["a", "b", "a"] {
        let crate::model::FlipOutcome::Changed(change) =
            st.flip(name, None, &req, &Default::default()).unwrap()
        else {
            panic!()
        };
        store
            .append_journal(&JournalEntry {
                service: name.into(),
                outcome: "ok".into(),
                change,
                seq: None,
                state: None,
            })
            .unwrap();
    }
    fs::OpenOptions::new()
        .append(true)
        .open(store.journal_path())
        .unwrap()
        .write_all(b"garbage line\n")
        .unwrap();
    assert_eq!(store.read_journal(None).unwrap().len(), 3);
    let a = store.read_journal(Some("a")).unwrap();
    assert_eq!(a.len(), 2);
    assert_eq!(a[1].change.generation, 3);
    fs::remove_dir_all(&d).unwrap();
}

fn two_services() -> DesiredState {
    let cfg = crate::config::parse(
        Path::new("t"),
        "interfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"1.1.1.1:1\"\nprotocol=\"tcp\"\nblue=[\"1.1.1.2:1\"]\ngreen=[\"1.1.1.3:1\"]\n[[service]]\nname=\"b\"\nvip=\"1.1.1.1:2\"\nprotocol=\"tcp\"\nblue=[\"1.1.1.2:2\"]\ngreen=[\"1.1.1.3:2\"]\n",
    )
    .unwrap();
    let mut st = DesiredState::default();
    st.reconcile(cfg.service_names()).unwrap();
    st
}

/// Flips `name` in `st` and journals it as the daemon does.
fn flip_journalled(store: &LocalStore, st: &mut DesiredState, name: &str) -> Change {
    let req = crate::model::Request {
        user: "t".into(),
        ..Default::default()
    };
    let crate::model::FlipOutcome::Changed(change) =
        st.flip(name, None, &req, &Default::default()).unwrap()
    else {
        panic!()
    };
    store
        .append_change(name, &change, st.service(name).unwrap())
        .unwrap();
    change
}

#[test]
fn changes_after_the_snapshot_are_replayed_from_the_journal() {
    let d = tmpdir("replay");
    let store = LocalStore::open(&d).unwrap();
    let mut st = two_services();
    flip_journalled(&store, &mut st, "a");
    store.save(&st).unwrap();
    let snapshot = fs::read(store.path()).unwrap();
    assert!(!store.snapshot_due(Duration::ZERO, 1));
    // Acknowledged, journalled, not in the snapshot yet.
    flip_journalled(&store, &mut st, "a");
    flip_journalled(&store, &mut st, "b");
    assert!(store.snapshot_due(Duration::ZERO, 100));
    assert!(!store.snapshot_due(Duration::from_secs(60), 100));
    assert!(store.snapshot_due(Duration::from_secs(60), 2));
    assert_eq!(fs::read(store.path()).unwrap(), snapshot);
    // A crash in the middle of the next line.
    fs::OpenOptions::new()
        .append(true)
        .open(store.journal_path())
        .unwrap()
        .write_all(b"{\"service\":\"a\",\"outcome\":\"ok\",\"kind\":\"fl")
        .unwrap();

    let again = LocalStore::open(&d).unwrap();
    let loaded = again.load().unwrap();
    assert_eq!(loaded, st, "history and every field replayed");
    assert_eq!(loaded.services["a"].generation, 3);
    assert_eq!(loaded.services["a"].history.len(), 1);
    assert!(again.snapshot_due(Duration::ZERO, 1));
    // The next change ends the torn line and numbers on.
    let mut st2 = loaded.clone();
    flip_journalled(&again, &mut st2, "b");
    assert_eq!(
        again.read_journal(None).unwrap().last().unwrap().seq,
        Some(4)
    );
    let third = LocalStore::open(&d).unwrap();
    assert_eq!(third.load().unwrap(), st2);
    // A snapshot that includes them all: nothing is replayed twice.
    third.save(&st2).unwrap();
    assert!(!third.snapshot_due(Duration::ZERO, 1));
    assert_eq!(LocalStore::open(&d).unwrap().load().unwrap(), st2);
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_snapshot_never_replaces_a_later_one_and_the_background_one_lands() {
    let d = tmpdir("order");
    let store = LocalStore::open(&d).unwrap();
    let mut st = two_services();
    flip_journalled(&store, &mut st, "a");
    let (older, ticket, seq) = (st.clone(), store.ticket(), store.last_seq.get());
    flip_journalled(&store, &mut st, "b");
    store.save(&st).unwrap();
    // The earlier snapshot finishes last (its thread was slow): it must
    // not put the older state back.
    store.snapshots.write(ticket, seq, &older).unwrap();
    assert_eq!(load_snapshot(store.dir()).unwrap(), Some((st.clone(), 2)));

    flip_journalled(&store, &mut st, "a");
    assert!(store.snapshot_due(Duration::ZERO, 1));
    store.snapshots.busy.store(true, SeqCst);
    assert!(
        store.save_in_background(st.clone()).is_none(),
        "one at a time"
    );
    store.snapshots.busy.store(false, SeqCst);
    store
        .save_in_background(st.clone())
        .unwrap()
        .join()
        .unwrap();
    assert!(!store.snapshot_due(Duration::ZERO, 1));
    assert_eq!(load_snapshot(store.dir()).unwrap(), Some((st.clone(), 3)));

    // A snapshot that cannot be written leaves the changes due.
    flip_journalled(&store, &mut st, "b");
    let tmp = d.join("state.json.tmp");
    fs::create_dir(&tmp).unwrap();
    store
        .save_in_background(st.clone())
        .unwrap()
        .join()
        .unwrap();
    assert!(store.snapshot_due(Duration::ZERO, 1));
    assert_eq!(load_snapshot(store.dir()).unwrap().unwrap().1, 3);
    fs::remove_dir(&tmp).unwrap();
    store
        .save_in_background(st.clone())
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(load_snapshot(store.dir()).unwrap(), Some((st, 4)));
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_revert_record_restores_the_state_and_its_history() {
    let d = tmpdir("revert");
    let store = LocalStore::open(&d).unwrap();
    let mut st = two_services();
    flip_journalled(&store, &mut st, "a");
    store.save(&st).unwrap();
    let before = st.clone();
    let change = flip_journalled(&store, &mut st, "a");
    store
        .append_revert(
            "a",
            "data plane: test",
            &change,
            before.service("a").unwrap(),
        )
        .unwrap();
    let loaded = LocalStore::open(&d).unwrap().load().unwrap();
    assert_eq!(loaded, before);
    let j = store.read_journal(Some("a")).unwrap();
    assert_eq!(j.last().unwrap().outcome, "reverted: data plane: test");
    // The last change (what status shows and undo restores) is the one
    // before the reverted one; a new change takes its generation again.
    let first = store.read_journal(Some("a")).unwrap()[0].change.clone();
    assert_eq!(loaded.services["a"].history, [first]);
    let mut st = before;
    let again = flip_journalled(&store, &mut st, "a");
    assert_eq!(again.generation, change.generation);
    let loaded = LocalStore::open(&d).unwrap().load().unwrap();
    assert_eq!(loaded.services["a"].history, [again]);
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_rotated_journal_goes_on_numbering_after_the_snapshot() {
    let d = tmpdir("rotate");
    let store = LocalStore::open(&d).unwrap();
    let mut st = two_services();
    for _ in 0..3 {
        flip_journalled(&store, &mut st, "a");
    }
    store.save(&st).unwrap();
    // Moved away by hand (the snapshot has all of it); a new daemon
    // starts an empty one.
    fs::rename(store.journal_path(), d.join("journal.jsonl.1")).unwrap();
    let again = LocalStore::open(&d).unwrap();
    let mut st2 = again.load().unwrap();
    assert_eq!(st2, st);
    flip_journalled(&again, &mut st2, "a");
    assert_eq!(again.read_journal(None).unwrap()[0].seq, Some(4));
    assert_eq!(LocalStore::open(&d).unwrap().load().unwrap(), st2);
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn the_stores_upkeep_snapshots_and_rotates_by_its_configured_size_once_a_second() {
    let d = tmpdir("upkeep");
    let mut store = LocalStore::open(&d).unwrap();
    let mut st = two_services();
    store.save(&st).unwrap();
    // Past the smallest journal_max_size there is (16 KiB).
    let mut changes = 0;
    while fs::metadata(store.journal_path()).map_or(0, |m| m.len()) <= 16 << 10 {
        flip_journalled(&store, &mut st, "a");
        changes += 1;
    }
    let len = fs::metadata(store.journal_path()).unwrap().len();
    let config = crate::config::parse(
        Path::new("t"),
        "interfaces = [\"e\"]\njournal_max_size = \"16KiB\"\n",
    )
    .unwrap();
    // Changes wait: once they pause, the snapshot is written (off the
    // caller's thread). The journal is never longer than the default.
    let deadline = Instant::now() + Duration::from_secs(5);
    // (The store counts the snapshot once its thread has written it: wait
    // for that, not only for the file, or the rotation below may find the
    // snapshot behind.)
    while load_snapshot(&d).unwrap().map(|(_, seq)| seq) != Some(changes)
        || store
            .snapshots
            .saved_seq
            .load(std::sync::atomic::Ordering::SeqCst)
            != changes
    {
        assert!(Instant::now() < deadline, "the snapshot did not land");
        DesiredStore::upkeep(&mut store, &st);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(d.join(paths::JOURNAL_FILE).exists(), "64 MiB by default");
    DesiredStore::reconfigure(&mut store, &config);
    store.rotation_checked = Some(Instant::now());
    DesiredStore::upkeep(&mut store, &st);
    assert!(
        d.join(paths::JOURNAL_FILE).exists(),
        "looked at within a second"
    );
    store.rotation_checked = Some(Instant::now() - Duration::from_millis(1100));
    DesiredStore::upkeep(&mut store, &st);
    assert!(
        !d.join(paths::JOURNAL_FILE).exists(),
        "past journal_max_size"
    );
    assert_eq!(
        fs::metadata(d.join(paths::JOURNAL_ROTATED_FILE))
            .unwrap()
            .len(),
        len
    );
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn the_daemon_rotates_a_long_journal_once_the_snapshot_has_it_and_history_reads_both() {
    let d = tmpdir("selfrotate");
    let store = LocalStore::open(&d).unwrap();
    let mut st = two_services();
    store.save(&st).unwrap();
    for _ in 0..4 {
        flip_journalled(&store, &mut st, "a");
    }
    let len = fs::metadata(store.journal_path()).unwrap().len();
    // Long enough, but the snapshot lacks the changes: not yet.
    assert_eq!(store.rotate_journal(len - 1).unwrap(), None);
    store.save(&st).unwrap();
    assert_eq!(
        store.rotate_journal(len).unwrap(),
        None,
        "not longer than max"
    );
    assert_eq!(store.rotate_journal(len - 1).unwrap(), Some(len));
    assert!(!store.journal_path().exists());
    let rotated = d.join(paths::JOURNAL_ROTATED_FILE);
    assert_eq!(fs::metadata(&rotated).unwrap().len(), len);
    assert_eq!(store.rotate_journal(0).unwrap(), None, "no journal");
    flip_journalled(&store, &mut st, "a");
    flip_journalled(&store, &mut st, "b");
    // History: the part moved away, then the journal, in order.
    let seqs = |h: Vec<JournalEntry>| h.iter().map(|e| e.seq.unwrap()).collect::<Vec<_>>();
    assert_eq!(seqs(store.read_journal(None).unwrap()), [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        seqs(store.read_journal(Some("a")).unwrap()),
        [1, 2, 3, 4, 5]
    );
    // A restart replays the journal over the snapshot: the moved part
    // is not needed, and numbering goes on.
    let again = LocalStore::open(&d).unwrap();
    let mut st2 = again.load().unwrap();
    assert_eq!(st2, st);
    flip_journalled(&again, &mut st2, "b");
    assert_eq!(
        seqs(again.read_journal(None).unwrap()),
        [1, 2, 3, 4, 5, 6, 7]
    );
    // The next rotation replaces the moved part: two parts at most. The
    // replaced part is removed off the caller's thread; one a crash
    // left is removed first.
    let retired = d.join(format!("{}.old", paths::JOURNAL_ROTATED_FILE));
    fs::write(&retired, "left by a crash").unwrap();
    again.save(&st2).unwrap();
    assert!(again.rotate_journal(1).unwrap().is_some());
    assert_eq!(seqs(again.read_journal(None).unwrap()), [5, 6, 7]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while retired.exists() || again.snapshots.retiring.load(SeqCst) {
        assert!(Instant::now() < deadline, "the replaced part stays");
        std::thread::sleep(Duration::from_millis(10));
    }
    flip_journalled(&again, &mut st2, "a");
    // A rotation between history's two opens: one file under both
    // names, read once.
    fs::remove_file(&rotated).unwrap();
    fs::hard_link(again.journal_path(), &rotated).unwrap();
    assert_eq!(seqs(again.read_journal(None).unwrap()), [8]);
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_lost_snapshot_beside_a_journal_is_refused_not_taken_for_a_first_start() {
    let d = tmpdir("lost");
    let store = LocalStore::open(&d).unwrap();
    let mut st = two_services();
    store.save(&st).unwrap();
    flip_journalled(&store, &mut st, "a");
    fs::remove_file(store.path()).unwrap();
    let e = LocalStore::open(&d).unwrap().load().unwrap_err();
    assert!(matches!(e, StateError::Missing { .. }), "{e}");
    assert!(e.to_string().contains("refusing to guess"), "{e}");
    // Only the rotated part left: the same.
    fs::rename(store.journal_path(), d.join(paths::JOURNAL_ROTATED_FILE)).unwrap();
    let e = LocalStore::open(&d).unwrap().load().unwrap_err();
    assert!(matches!(e, StateError::Missing { .. }), "{e}");
    // Moved aside on purpose: a first start.
    fs::remove_file(d.join(paths::JOURNAL_ROTATED_FILE)).unwrap();
    assert_eq!(
        LocalStore::open(&d).unwrap().load().unwrap(),
        DesiredState::default()
    );
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn the_tick_rate_is_kept_for_its_own_boot_only() {
    let d = tmpdir("tick");
    let store = StateDir::open(&d).unwrap();
    assert_eq!(store.kept_tick_rate("boot-a"), None, "no file");
    store.keep_tick_rate("boot-a", 250).unwrap();
    assert_eq!(store.kept_tick_rate("boot-a"), Some(250));
    assert_eq!(store.kept_tick_rate("boot-b"), None, "another boot");
    for junk in ["", "boot-a", "boot-a x", "boot-a 250 1"] {
        fs::write(d.join(paths::TICK_RATE_FILE), junk).unwrap();
        assert_eq!(store.kept_tick_rate("boot-a"), None, "{junk:?}");
    }
    fs::remove_dir_all(&d).unwrap();
}

/// Where `a_failed_append_leaves_whole_lines` tells its child process the
/// state directory is.
const FAILED_APPEND_DIR: &str = "BGSWITCH_TEST_FAILED_APPEND_DIR";

/// An append the file system stops half-way (a file size limit lets part of
/// the line be written, then fails with EFBIG) is cut off again: the journal
/// keeps whole lines, and the failed change takes no number. A size limit
/// is per process, so the append runs in a child process of this test
/// binary (`failed_append_in_a_child`); this test checks that it ran and
/// passed, and reads the journal it left.
#[test]
fn a_failed_append_leaves_whole_lines() {
    let d = tmpdir("failappend");
    fs::create_dir_all(&d).unwrap();
    let child = format!(
        "{}::failed_append_in_a_child",
        module_path!().split_once("::").expect("crate::module").1
    );
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            &child,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(FAILED_APPEND_DIR, &d)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{child} failed:\n{text}");
    assert!(
        text.contains("test result: ok. 1 passed"),
        "{child} did not run:\n{text}"
    );
    let journal = fs::read_to_string(d.join(paths::JOURNAL_FILE)).unwrap();
    assert!(journal.ends_with('\n'), "{journal:?}");
    let store = LocalStore::open(&d).unwrap();
    assert_eq!(
        store
            .read_journal(None)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>(),
        [Some(1), Some(2)],
        "{journal}"
    );
    assert_eq!(journal.lines().count(), 2, "{journal}");
    fs::remove_dir_all(&d).unwrap();
}

/// The child of `a_failed_append_leaves_whole_lines` (run only by it).
#[test]
#[ignore = "a child process of a_failed_append_leaves_whole_lines"]
fn failed_append_in_a_child() {
    let d = PathBuf::from(
        std::env::var_os(FAILED_APPEND_DIR)
            .expect("run by a_failed_append_leaves_whole_lines, which gives the directory"),
    );
    let store = LocalStore::open(&d).unwrap();
    let mut st = two_services();
    flip_journalled(&store, &mut st, "a");
    let before = fs::read(store.journal_path()).unwrap();
    // Files may grow 8 bytes past the journal: the next line is written in
    // part, then the write fails (EFBIG, and SIGXFSZ, ignored here).
    let limit = |cur: u64| {
        let l = libc::rlimit {
            rlim_cur: cur,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: a valid rlimit for this process.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &l) }, 0);
    };
    // SAFETY: ignoring a signal installs no handler.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    limit(before.len() as u64 + 8);
    let req = crate::model::Request::default();
    let mut st2 = st.clone();
    let crate::model::FlipOutcome::Changed(change) =
        st2.flip("a", None, &req, &Default::default()).unwrap()
    else {
        panic!()
    };
    let e = store
        .append_change("a", &change, st2.service("a").unwrap())
        .expect_err("the append must fail");
    limit(libc::RLIM_INFINITY);
    assert!(
        matches!(&e, StateError::Write { source, .. } if source.raw_os_error() == Some(libc::EFBIG)),
        "the write itself must have failed, past its first bytes: {e:?}"
    );
    let after = fs::read(store.journal_path()).unwrap();
    assert!(
        after == before,
        "the part of the line that was written must be cut off again: the journal has {} bytes, \
         had {}; past them: {:?}",
        after.len(),
        before.len(),
        String::from_utf8_lossy(after.get(before.len()..).unwrap_or_default())
    );
    // The failed change took no number.
    flip_journalled(&store, &mut st, "a");
    let j = store.read_journal(None).unwrap();
    assert_eq!(
        j.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [Some(1), Some(2)]
    );
}

#[test]
fn a_service_reads_its_own_lines_and_numbers_are_read_without_parsing() {
    let d = tmpdir("own");
    let store = LocalStore::open(&d).unwrap();
    let mut st = two_services();
    flip_journalled(&store, &mut st, "a");
    flip_journalled(&store, &mut st, "b");
    flip_journalled(&store, &mut st, "a");
    let a = store.read_journal(Some("a")).unwrap();
    assert_eq!(
        a.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [Some(1), Some(3)]
    );
    assert_eq!(store.read_journal(Some("")).unwrap(), []);
    // A name that starts with another's.
    let mut ab = a[0].clone();
    ab.service = "ab".into();
    ab.seq = Some(4);
    // A reason that spells the field inside a string cannot fool it.
    ab.change.reason = Some("\"seq\":99".into());
    store.append_journal(&ab).unwrap();
    assert_eq!(store.read_journal(Some("a")).unwrap().len(), 2);
    assert_eq!(store.read_journal(Some("ab")).unwrap(), [ab.clone()]);
    let text = fs::read_to_string(store.journal_path()).unwrap();
    let seqs: Vec<Option<u64>> = text.lines().map(line_seq).collect();
    assert_eq!(seqs, [Some(1), Some(2), Some(3), Some(4)]);
    assert_eq!(
        line_seq("{\"service\":\"a\",\"outcome\":\"refused: x\"}"),
        None
    );
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn second_lock_is_refused() {
    let d = tmpdir("lock");
    let store = StateDir::open(&d).unwrap();
    let held = store.lock().unwrap();
    let e = store.lock().unwrap_err();
    assert!(matches!(e, StateError::Locked { .. }), "{e}");
    drop(held);
    store.lock().unwrap();
    fs::remove_dir_all(&d).unwrap();
}
