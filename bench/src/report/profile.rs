//! What the profiles showed, what was done and what was tried: the text
//! RESULTS.md and results.json carry, with this run's numbers filled in.

use serde_json::Value;

use super::{case, f, fwd, two_decimals};

/// What the profiles showed, what was tried, and the proposals (text kept
/// here so RESULTS.md and results.json carry it; the numbers it refers to are
/// in the tables below it).
pub const PROFILE: &str = r#"## Where the time goes, what was done, what is left

**The established path now** (this round's commits, from 0a07a23 on; measured in the tables below): parse
(word loads) → this CPU's `FLOW_CACHE` slot (an array read the verifier inlines; key, generation
and age checked) → the service's control word (enabled) → four per-CPU counters → rewrite with
the flow's precomputed checksum deltas → MACs (four stores) → `bpf_redirect_map` (or XDP_TX).
No hash-map lookup, no `bpf_fib_lookup`, no clock helper. In the program as the kernel
translated it (`bpftool prog dump xlated`), parsing is about 90 BPF instructions, each counter
update an inlined per-CPU lookup of 15–20, and the only helper call left on the path is the
redirect ({part_devmap_redirect} ns alone in the component table).

**What was done in this round**, each priced by the component table of this run:

1. **Next hop kept per flow** (the previous round's proposal 5): the flow entry keeps what
   `bpf_fib_lookup` answered (egress, both MACs, the packet length it allowed), so established
   packets skip it: −{part_fib_words} ns. It is looked up again when the daemon bumps `FLOW_GEN` — on
   every route, rule, address, neighbour or link notification it hears over netlink (folded to
   at most one bump per 10 ms after the first), on interface changes and after deleting flows —
   when the flow's 100-ms refresh comes (the safety net without a daemon), and for any packet
   longer than the one it was looked up for (the MTU check is never skipped). Tests: a neighbour
   change reaches an open flow right after the netlink event; an over-MTU packet goes to the
   stack.
2. **Clock in kernel ticks**: `bpf_jiffies64` is inlined by the verifier ({part_jiffies} ns against
   {part_ktime_coarse} ns for `bpf_ktime_get_coarse_ns`); the daemon measures HZ at load from two (jiffies, monotonic) pairs 250 ms apart
   with a small socket-filter program and converts timeouts and ages.
3. **Per-CPU flow cache** in front of `FLOWS`: slots of 64 B (65 536 per CPU here) holding a copy of a flow
   direction's decision; a hit replaces the LRU lookup ({part_lru16} ns) with an inlined array read. A
   slot is used only while the entry would not change (no SYN/FIN/RST, `last_seen` within the
   refresh, current generation, TTL > 1, length within the cached next hop's), so decisions are
   the same with or without it; the hostile-frame property test (400 000 frames in the suite,
   3 000 000 in a soak, half of them with a FIB so the cache is used) checks every rewrite
   against an independent model, and found one bug on the way (a SYN reusing a closed flow's
   5-tuple that went to the stack left a stale slot; fixed, with a regression test).
4. Checksum deltas of a flow's rewrite (address, port, TTL) precomputed in its slot; header
   fields read and written as whole words instead of byte arrays; the entry function inlined;
   the cached path updates its two global counters with one per-CPU lookup.
5. **One flow entry instead of two** (the proposal of the first draft of this round): replies
   no longer have an entry of their own. A reply's source names its service in
   `REPLY_SOURCES` (the config already refuses a backend address:port in two services), which
   gives the VIP and so the flow's key; the reply is rewritten only if that flow is pinned to
   this backend. A new flow makes one LRU insert instead of two (about −{part_lru16_update} ns), and
   a flow takes 160 B of kernel memory instead of 256 (the entry carries both directions' next
   hops). Replies that miss the per-CPU cache make three lookups instead of one; they miss it
   once per refresh.

6. **Address bitmaps** in front of the slow path: a packet whose destination is no VIP and whose
   source is no backend (the host's own traffic) skips the flow-table, `SERVICES` and
   `REPLY_SOURCES` lookups after one inlined array read each (the non-VIP row of part 1).
7. **The flow cache in a plain array** (one region per CPU id, indexed with the inlined
   `bpf_get_smp_processor_id`) instead of a per-CPU array. A profile of the forwarding pipeline
   with a new flow in every packet (`perf record`, sample addresses mapped onto the JIT image read
   with BPF_OBJ_GET_INFO_BY_FD) put two of the program's hottest instructions on one cold slot:
   a per-CPU array's inlined lookup first loads the slot's per-CPU pointer from a table of its
   own (8 B × 65 536 slots), then the slot — two dependent cache misses where an array has one.
   In an interleaved A/B of the two builds (`--spin-fwd`), a new flow in every packet went from
   0.79–0.81 to 0.84–0.87 Mpps, 1 000 000 flows from 1.26–1.29 to 1.35–1.45 Mpps; established
   packets are unchanged (28 ns over XDP_PASS for both builds, `--spin established`).
8. **A SYN never reads its cache slot** (it cannot use it, and for a new flow it is cold memory):
   the packet's own conditions are checked before the slot's. Cold new flow in part 1 of an
   interleaved pair of runs: 911 → 859 ns.
9. **A new flow's entry is built in place with ten 8-byte stores**: the struct literal's four
   `[0; 6]` MAC fields had each become a call to the byte-at-a-time `memset` subprogram
   (found with `bpftool prog dump xlated … linum`). Interleaved `--spin newflow`: 1 248–1 304 →
   1 205–1 237 ns; `--spin-fwd new`: 0.85–0.89 → 0.88–0.91 Mpps. No `memset`, `memmove`
   or `memcpy` subprogram call is left in the packet programs (`llvm-objdump -dr -l`): aya-log's
   copies are in the log program, and the IPv6 cache fill's and a noted event's address copies
   (a byte-at-a-time `memmove` or `memset` each) are word stores since this round.

Measured but not adopted: `BPF_F_NO_COMMON_LRU` makes an LRU update slower here
({part_lru16_update_pcpu} ns against {part_lru16_update} ns), and cold new flows too (interleaved
`--spin newflow`: 1 340–1 357 ns with the common LRU, 1 464–1 575 ns with per-CPU lists;
`--spin-fwd new`: 0.81–0.88 against 0.80–0.85 Mpps); and a flow cache sixteen times larger
(up to 2^20 slots per CPU, so that 1 000 000 flows on this 2-CPU machine would fit): 1.37–1.48
→ 1.46–1.50 Mpps with 1 000 000 flows, too little for 64 MiB per CPU — a direct-mapped cache
at one flow per slot holds only about 1/e of them, and each hit is still a cold line.

The data plane's own log (aya-log) adds nothing to the established path: its events sit on the
rare branches only (no usable route, an egress interface bgswitch is not attached to, a flow not
recorded, an empty pool), behind a once-a-second gate per kind, and are written by a program of
their own (a tail call once the verdict is known), so the packet programs carry no formatting.

The previous round (on the data plane of commit 9d96570) removed a byte-loop `memset` of the FIB
parameters ({part_fib_zeroed - part_fib_words} ns), looked up `FLOWS` before `SERVICES`, and shrank
the flow key to 16 B (IPv4 in its own table).

**New flows.** A new TCP flow's SYN looks up `FLOWS` and misses (a cold bucket), reads its
half-open bucket (one cold cache line of seals and keys) and writes one way of it, finds its
service with one 64-bit load of its VIP and port's slot in the IPv4 services' index in
`ADDR_FILTER` (a `SERVICES` lookup, {part_hash20} ns when warm, only for a slot two services
share; IPv6 looks up `SERVICES`) and takes its backend's kept next hop (`BACKEND_HOPS`,
per backend and CPU, under the same freshness, generation and MTU rules as a flow's; only while
the host's routing rules select by destination alone, which the daemon reads once a second): no
`bpf_fib_lookup` per flow (four interleaved pairs of part 1 with it on and off, in an earlier
round: 40–80 ns less in every pair). A cache miss costs 150–250 ns on this VM (nested paging),
and a new flow's table memory is cold by nature: the 250-ns target (issue 17) leaves room for
little more than one. {new_flow} ns in this run (the targets table).

**The half-open table is an array of two-way buckets**, no longer an LRU hash. With the LRU
table a profile of `bgswitch-bench --spin newflow` put 36 % of the program's time in the LRU
update (27 % in `bpf_lru_pop_free`: taking a free node, or evicting when full) and 31 % in the
lookups that miss (`lookup_nulls_elem_raw`); an LRU element is also 144 bytes plus a bucket, in
three cache lines. A bucket (`bgswitch_common::HalfOpen`, 256 bytes for IPv4, page-aligned in a
memory-mapped array) holds two records; its seals and keys share its first line. A SYN reads
that line and writes one way: its own, else an empty one, else the one written first — no free
list, no eviction, no lock. A record is lost only when two later SYNs of its bucket come before
its handshake completes (a flood, or collisions at very high connection rates); its client's
retransmitted SYN is recorded again (tested: `xdp_program.rs`,
`half_open_records_share_two_way_buckets_and_a_lost_one_costs_its_flow_one_retransmitted_syn`).
Readers check a seal over the key and the record's fixed fields, so a way rewritten on another
CPU is never half read. The bucket is the top bits of the 5-tuple's flow hash (its own seed; the
flow cache's cheaper index folds the clients of one /16 into 2^16 values: in the IPv6 fuzz it
pushed out 2 925 of 60 000 frames' records, the flow hash none). Part 1 alone (`--only cost`),
interleaved runs of the same phase: the new TCP flow 407 and 428 ns with the LRU table, 289 and
286 ns with one record per slot, 267 and 275 ns with the two-way buckets (276 and 274 ns for
one-way in the same pair of rounds); the IPv6 new flow 675–726 → 483–508 ns; the completing ACK
511–516 → 417–453 ns. The services' index was tried then and dropped: it made the XDP program
exceed the verifier's million processed instructions. Nine tenths of what the verifier walked was
aya-log's formatting, inlined at the five rare-event sites (840 000 instructions for the XDP
program, 945 000 for TC); the messages are written by a program of their own now, reached by a
tail call once the verdict is known (89 000 and 91 000), and the index is in. Three interleaved
pairs of part 1 alone (`--only cost`): the new TCP flow 254, 287 and 302 ns with the index
against 289 and 298 ns (and one run in a slow phase) without; established packets unchanged
(26–27 ns in both).

The flow table is full in steady state (entries age out by eviction), so in the forwarding
pipeline every new flow also evicts; part 2's "a new flow in every packet" row (UDP) is what
heavy churn costs per core.

**A TCP connection records twice** since half-open flows have a table of their own (so a SYN flood
evicts no established connection: part 4, "A SYN flood against draining connections"): its SYN
misses `FLOWS` and writes its half-open bucket, and the client's ACK that completes the
handshake misses `FLOWS`, finds the half-open record, inserts it into `FLOWS` and empties its
way. Part 1's "new TCP connection" row adds both; before, a connection's one recording packet
was the SYN.

What meets the flatness target is a path with no per-flow memory at all, the issue's
"stateless fast path outside transitions", now built as `stateless = true` for TCP services
(README, "Stateless services"): in a stable period a packet's backend is the hash of its 5-tuple
over the active pool, for the SYN and every later packet alike, and its next hop the backend's
(one per backend and CPU, `BACKEND_HOPS`); nothing is read or written per flow. A change starts
a transition in the same 32-bit store: SYNs are recorded, and a non-SYN packet without a record
(a connection of the stable period) takes the stable period's pool, kept as the orphan pool, so
open connections keep their backends through flips and pool changes (tested:
`xdp_program::a_stateless_service_…`, `a_pool_change_in_a_stable_period_…`,
`e2e::a_stateless_service_keeps_connections_through_a_flip_and_a_routing_rule`). The daemon ends
the transition a TCP idle timeout later once a scan finds no live record disagreeing with the
new hash choice. The price, documented: a connection of a stable period silent for longer than
the TCP idle timeout across a change moves; live flows of a stable period are not counted, so
`--wait-drained` waits for the transition's end; a routing rule that selects on more than the
destination turns the stable periods off. UDP keeps the table (no SYN to tell new from old).
Part 1 measures the stateless path at {stateless_established} ns per packet over XDP_PASS (new
flow {stateless_new} ns: the same path; a fresh 5-tuple per call {stateless_fresh} ns), flat in
the number of flows by construction. A first version looked its service up in `SERVICES` and
hashed all ten words of the 5-tuple key: 94 ns; a profile put 15 % of the program's time in
the hash-map lookup and most of the rest in instruction count, so the service is now one 64-bit
load of a direct-mapped slot, the IPv4 hash takes three multiplies and the finaliser, and the
checksum deltas are kept with the backend's next hop (the cached path's rewrite). What remains
over the table path's cached packet (which reads one warm slot) is the pool and backend reads,
the hash and the next-hop checks — so with one hot flow the table path is cheaper, and with many
flows (cold slots) the stateless path is faster (part 2's stateless rows). This round trimmed
it further: the flow-cache index and key are computed only after the stateless check (every
packet computed them before), the spoofing guard builds its `SERVICES` key only for a source in
the VIP bitmap, and the cached rewrites (both paths) fold each checksum once, with one bounds
check for the port and the checksum. In an interleaved A/B of the two builds, `--spin stateless`
went from 70 to 60 ns per run (XDP_PASS: 22) and `--spin-fwd stateless:10000` from 3.80 to
3.92 Mpps. What is left to cut: a build without the spoofing guard, without the pool-size read
and without the counters, hashing with one multiply, ran at 50 ns per run against 58 for the
real path (interleaved `--spin stateless`, XDP_PASS 22): 28 ns over the baseline. Those pieces
cost about 1–2 ns each and are needed (the guard against replies looping through the
backends, the pool size to choose within it, the counters status and the error signal read);
merging the next hop and the counters into one per-CPU line would save about 1 ns of them.
The rest is what the table path pays too: the parse, the rewrite, the MACs and the redirect.
Where the stateless packet's time goes, step by step (builds of this commit that return XDP_PASS
at one point of the path each, a constant in the path's files; `--spin stateless`, three interleaved
rounds of the six builds, XDP_PASS 22.2 ns, the whole path 57.4–60.2 ns per run): the parse
4 ns; the settings, the clock, the service's slot and its control word 4.3; the TTL check, the
spoofing guard, the hash, the pool size and the backend 7.5; the backend's next hop and its
counters 2; the next-hop checks and the rewrite 6.3; the MACs, the global counters and the
redirect 12.7 — of which the redirect helper alone is about 10 ns (component table). Without
the backend's and the global counters, 3.5 ns less (56 against 59.7 ns, three rounds). So 30 ns
would leave the stateless logic 20 ns beside the redirect; it takes 28.

**85 % of the redirect ceiling.** The floor is the generator and the receiver on one veth pair.
Any load balancer adds a second hop: one more NAPI poll and XDP run, a redirect, its bulk queue
and flush. Part 2's ceiling row measures that hop alone: `xdp_redirect` writes the two MACs and
redirects through a DevMap, with no parse and no lookup. It reaches {ceiling_percent} % of the
floor ({ceiling_over_floor_ns} ns per packet over it). That hop is the limit of this path, so the
forwarding targets (issue 17) measure against the ceiling, no longer against the floor (60 % of
the floor, the target before, leaves a whole load-balancing program {floor_budget_ns} ns per
packet beyond a bare redirect); 85 % of the ceiling's rate leaves it {ceiling_budget_ns} ns. In
this run bgswitch takes {table_1_over_ceiling} ns beyond the ceiling with one flow (table),
{table_10k_over_ceiling} ns with 10 000 flows (table: {table_10k_ceiling_percent} % of the
ceiling's rate) and {stateless_10k_over_ceiling} ns with 10 000 flows (stateless:
{stateless_10k_ceiling_percent} %). Where the
stateless path's time goes in the pipeline was measured with builds that leave it early through
the kept next hop, without rewriting (interleaved `--spin-fwd stateless:10000`, before this
round's trims): parse about 8 ns; service slot and control word about 5; spoofing guard, hash,
pool and backend about 10; next hop and counters about 6; the checks, the rewrite and the rest
about 11. Each piece is a few dozen BPF instructions. No single removal (the counters, the pool
size, the spoofing guard) moved the rate by more than the noise (±1 %); removing both counter
updates together gained 2 %. The DevMap (array) and `bpf_redirect` rows of the component table
show that the redirect costs the same whichever way it is made. 85 % needs
{stateless_10k_ceiling_gap} ns less per packet on the stateless path and
{table_10k_ceiling_gap} ns less on the table path with 10 000 flows, of which
{table_10k_over_1} ns is what 10 000 flows cost it over one (the cold cache slot: "Many flows",
below).

**Many flows.** With 10 000 flows the per-CPU cache holds them all, but its slots, like the
`FLOWS` buckets, are spread over memory that misses the CPU caches and (in this VM, with nested
paging) the TLB: in a profile of the 10 000-flow pipeline nearly all of the program's time over
the 1-flow case sits on one instruction, the load of the slot's key (one cold line per packet,
the generator cycling through the flows); {table_10k_over_1} ns per packet in this run. A
plain BPF array keeps its values right after its 312-B header, 56 bytes into a cache line, so
each 64-B slot straddled two lines; the cache is now created memory-mapped (`BPF_F_MMAPABLE`),
for which the kernel puts the first value on a page boundary (as the half-open table's buckets
were already), so a slot is one line. It did not measurably move the rate: a first A/B (ten
interleaved rounds of `--spin-fwd bgswitch:10000` and `bgswitch:1` per build) gave 23.9 → 11.6 ns
per packet for 10 000 flows over one, but a second (six rounds, the old build and two aligned
ones) gave 11.6–23.9 ns old against 9.7–21.9 and 10.8–31.5 ns aligned: the two adjacent
lines of a straddling slot were missed together, at about the cost of one. It is kept (half the lines for the same flows, never more work).
What the cold slot costs is its page more than its line: a sweep of the flow count
(`--spin-fwd bgswitch:N`, three interleaved rounds, ns per packet over one flow, medians)
gave 100 flows −2, 300 flows 18.6, 1 000 flows 21.2, 3 000 flows 14.4, 10 000 flows 23.8 and
30 000 flows 23.8: the cost is there in full at 300 flows, whose slots (19 KB) fit the L1 data
cache but lie on about 300 different 4-KiB pages of the 4-MiB region. BPF maps larger than
32 KB are vmalloc'd in 4-KiB pages (no huge mapping; the kernel's own direct map here is in
1-GiB pages), and in this VM every TLB miss is a nested page walk. Packing the live flows into
fewer pages would need fewer slots (a direct-mapped cache of 10 000 flows in 16 384 slots
leaves 46 % of them sharing a slot, each packet of theirs a miss) or huge pages, which no BPF map gets;
aya has no map-of-maps (whose small inner arrays would be kmalloc'd in the direct map). Beyond 65 536 flows per CPU most packets take the
`FLOWS` path and refill a slot. Cost is therefore not flat from 1 to 1 000 000 flows (part 5); the bucket walk of a large
`FLOWS` table (`lookup_nulls_elem_raw`, 34–41 % of CPU samples with 10 000 or more flows in the
previous round's profile) is the dominant cost at that end. Size `max_flows` to the expected
working set: a table far larger than the live flows costs misses on every new lookup.

**Two CPUs.** Each CPU keeps its own cache region, counters and backend next hops; the flow
table is shared, but an established packet reads its CPU's cache slot and touches `FLOWS` only
once a refresh, so nothing a packet writes is shared between the cores. What the two-CPU rows
measure moves with the machine more than with the path: `bgswitch-bench --spin-fwd` (3 s each,
one CPU then two, three interleaved rounds, the same build) gave the table path with 10 000 flows
per CPU 1.99×, 1.82× and 1.37× one CPU's rate, the stateless service 1.94×, 1.51× and 1.86×, and
the table path with one flow per CPU (no memory to miss) 2.41×, 1.21× and 2.06×: the second
CPU is this VM's to give or take from round to round, whichever path runs. Part 2 therefore
runs the floor and the redirect ceiling with two generators as well, in the same rounds: in
this run the floor reached {floor_two_cpus}× one CPU's floor and the ceiling
{ceiling_two_cpus}× one CPU's ceiling, against bgswitch's {table_two_cpus}× (table) and
{stateless_two_cpus}× (stateless), each the median of the per-round ratios.

**HTTP latency.** Part 3's keep-alive run is a closed loop: 16 connections, each sending its
next request the moment an answer arrives, so every system runs at the most it can on the two
CPUs it shares with wrk and the servers, and its p99 is the tail of that saturation more than
of the path. A system
that reaches more requests per second (bgswitch's TC path led every run) loads the CPUs more
and may show the longer tail: in full runs before this one its saturated p99 was behind,
level or ahead of nftables' from run to run. The paced run offers every system the same load
(64 connections, each waiting 1 ms after an answer, below what any of them saturates at) and
is where latencies compare; the target's p99 comes from it, its requests/s from the saturated
run.

**Memory.** `FLOWS` takes 160 B of kernel memory per flow (one 80-B value with its key,
element header and bucket; part 5 measures it); the per-CPU cache adds a fixed 64 B × its
slots (`max_flows` ÷ CPUs, 1 024 to 65 536) per possible CPU: 4 MiB here.

**Measuring.** BPF_PROG_TEST_RUN of a program that is not attached anywhere rebuilds the XDP
dispatcher image and waits for an RCU grace period on every call (~20 ms here), so the bench
keeps the measured programs attached to an idle veth in its scratch namespace. Identity rewrite
with TTL 255 and repeat 200 makes every timed run take the full path (checked with repeat 1
first); new flows use a fresh 5-tuple per call, cold. This machine is shared and has fast and slow phases:
the same code measured 26 ns for the established packet in one full run and 44–47 ns in
other runs of the same hour (with an XDP_PASS baseline of 21–22 ns against 26–28 ns), and the
10 000-flow rate 2.4 to 3.6 Mpps; compare within one run only, and check a change with an
interleaved A/B of two builds (`--spin`, `--spin-fwd`) rather than across runs.

**Flip.** A flip is a whole process (about {bgswitch_version_ms} ms to spawn a `bgswitch` that does
nothing, in this run, against {true_ms} ms for `/bin/true`), one durable write on its path — the change's journal line, with the
service's whole state after it, appended and fdatasynced: about {journal_append_ms} ms on this
machine, whose `/run` is on the ext4 root disk, not a tmpfs — and the daemon's work in between.
Until this round the state file was rewritten on the path as well, before the journal line
(`state.json`, then with the last 16 changes of each service, to a temporary file, fsync, rename,
directory fsync: {snapshot_write_ms} ms here); now it is a snapshot the daemon writes once
changes pause for a second, and loading replays the journal's later changes (README,
"Journal"; the order "durable before data plane" is unchanged). In an interleaved A/B of the
two daemons on part 4 alone (`BGSWITCH_BIN=… bgswitch-bench --only flip`, two pairs), the median
flip under load went from 4.87 and 4.62 ms to 3.43 and 3.40 ms; without load 2.76 and 3.23 ms
against 2.81 and 2.87 ms, within the noise. Under client load the two CPUs are shared with the
prober, the keep-alive clients and the servers. The target (issue 17) is the whole command faster
than HAProxy's runtime-API switch in the same run (a process that sends one line and reads the
answer): {flip_ms} ms against {haproxy_flip_ms} ms under load, {idle_flip_ms} ms against
{haproxy_idle_flip_ms} ms idle. HAProxy's switch changes its memory only; bgswitch's waits for
its journal line's fdatasync ({journal_append_ms} ms alone here; the target rows give the command
less it).

The process start is the rest, and this round cut it. `bgswitch` was one 18-MB binary: its start
applied 16 000 relative relocations (243 KB of `.data.rel.ro` copied on write: 224 page faults
against 50 for `/bin/true`) and built every command's arguments with clap. Now `bgswitch` is the
client alone (3.3 MB, 2 400 relocations: no data plane, tokio, etcd, hyper or ratatui;
`tests/tests/binaries.rs` checks its symbols) and becomes the full binary, `bgswitchd`, by exec
for the daemon and the commands that need those parts; clap builds only the arguments of the
command run (`defer`). Measured (`perf stat -r 300`, the same machine minutes apart): a client
command that finds no daemon, 1.64 → 1.30 ms elapsed and 1.16 → 0.69 ms of CPU with the split,
then 0.95 → 0.67 ms of CPU with `defer`; HAProxy's sender here is the bench binary itself
(11 MB, 107 page faults), so both sides pay a Rust process start. Part 4 alone (`--only
flip`) with the old and the new binaries: idle 2.4 ms (the full run before) → 1.7–1.9 ms, against
HAProxy's 1.2–1.3 ms in the same runs, where the journal line's fdatasync took 0.32–0.47 ms. What
is left of the gap is that write and the daemon's wake-up on a loaded CPU; durable as now, the
whole command cannot be faster than HAProxy's memory-only switch by more than the disk allows
here. The bench's watcher thread (polling the control word to time "applied") now runs on every
other flip only, and the command times come from the flips it does not watch.

Then the client became a static PIE (`cargo xtask build` links it again with `crt-static`; the
package ships that one): no dynamic loader, no libc or libgcc_s to map. Measured (spawn to exit,
200 each, alternating, the same minute, twice): `bgswitch --version` 0.83 and 0.66 ms dynamic,
0.46 and 0.40 ms static, `/bin/true` 0.44 and 0.42 ms; a flip against a daemon on a veth test bed,
idle, 1.49 and 1.30 ms → 1.13 and 1.08 ms. Part 4 alone (`--only flip`) right after: idle 1.45 ms
against HAProxy's 1.35 ms, the fdatasync 0.33 ms (the command less it 1.12 ms); under load 2.02
against 2.17 ms. With the client starting as fast as `/bin/true`, what is left between an idle flip
and HAProxy's memory-only switch is the disk's cache flush: this virtio disk has a write-back cache
and no FUA (`/sys/block/vda/queue/fua` 0), so a durable append costs a flush whatever the file
(`ext4_sync_file` → `blkdev_issue_flush` in the daemon's profile; a preallocated file measured the
same). The daemon's own CPU per flip, its fdatasync included, is 0.2 ms (300 flips, 6 ticks).

Under client load the daemon, idle in `epoll_wait`, also waits for a CPU that wrk, the servers
and softirq keep busy, where HAProxy's process is running already. The packaged unit now runs
the daemon at `Nice=-10` (its loop answers a rollback before the load it serves; the user's
checks go back to nice 0), and the test bed and this bench start it so, as installed. Measured
before the change with `--only flip` and the daemon reniced by hand: under load 1.99 ms against
HAProxy's 1.60, where at nice 0 the same binaries took 2.42–2.73 ms against 1.56–1.57.

A flip also copied every service's state (to make the change on) and, for the state file,
serialised it: with the most services (256) each holding 16 changes, a flip took 11–13 ms
(spawn to exit, no load; the old daemon on a 256-service namespace), 6 ms with 4 changes each
(part 5's setup, `BGSWITCH_BIN` of the old daemon). Now a change copies its own service only,
the state keeps each service's last change (status shows it; `history` reads the journal), and
part 5 measures flips with 256 services ("Flips with the most services"): {most_services_flip_ms} ms, against
{idle_flip_ms} ms with part 4's two services.

The daemon's slower work runs off its loop, so a request does not queue behind it (part 5, "The
daemon under work"). The periodic snapshot (with 256 services about 3 ms: serialising 200 KB,
fsync, rename, directory fsync) is written on a thread of its own, the loop paying for a copy of
the state; a snapshot replaces the file only if no later one is there, so the synchronous ones
(start, reload, SIGTERM) always win. The end of a watch is journalled like a change (one line),
not snapshotted on the loop. `history` reads the journal on a blocking thread, line by line,
parsing only its service's lines. In three interleaved pairs of part 5's daemon under work
(`BGSWITCH_BIN=… bgswitch-bench --only services`), the slowest of 200 flip round trips went
from 2.05, 1.96 and 4.11 ms (snapshot on the loop) to 1.01, 1.21 and 1.09 ms,
the median unchanged (0.5–0.7 ms); `history` of one service in a 75-MB journal, read into memory
whole, took 55–69 ms and 75 MB per request; line by line 15–19 ms and a 256-KB buffer. In this
run: the slowest flip {under_work_flip_max_ms} ms alone, {under_work_history_flip_max_ms} ms while
`history` was read back to back; `history` {under_work_history_ms} ms. The journal is bounded: past
`journal_max_size` (64 MiB by default), once the snapshot has all of it, the daemon moves it to
`journal.1.jsonl`, and `history` reads both parts. The move waits for changes to pause (the
snapshot must include all of the part it moves away), so part 5's padded journal, with flips
arriving every 10 ms, stays where it is until the daemon stops. A restart no longer measures the kernel tick rate (250 ms) when an earlier
start in the same boot did (`state_dir/tick-rate`, with the boot id): in two interleaved pairs of
`--only services`, its restarts went from 752–859 ms to 436–533 ms. Most of what is left is the
verifier: in a trace of a start, loading the 11 257-instruction XDP program (BPF_PROG_LOAD) took
255 ms; parsing the kernel's BTF, which aya does whether or not it is needed, 16 ms. Since the
rare events' messages moved to a program of their own the verifier walks a tenth of what it did
(the XDP program 840 000 → 89 000 instructions, TC 945 000 → 91 000): the restart below took
1 278–2 212 ms in the four full runs before, 560 ms in the first after (at 2efe8ca).

Measured and not adopted: running the
journal's fdatasync alongside the state file's fsync (two threads) saved nothing on this disk;
linking `bgswitch` with packed relative relocations (`-z pack-relative-relocs`) took 10 page
faults off its start and no measurable time; without PIE it started 0.15–0.3 ms sooner, at the
price of address-space randomisation for a daemon that runs as root; running the work off the
loop (`history`, flow scans, the snapshot) ten nice steps lower, so the loop gets the CPU first:
over six interleaved pairs of `--only services`, the slowest flip during back-to-back `history`
averaged 3.7 against 4.8 ms and the p99 1.8 against 2.0 ms, within the runs' spread (1.9–6.4 ms
for the slowest flip either way)."#;

/// Replaces `{name}` placeholders in the profile text with figures from this
/// run's component table (ns over XDP_PASS), `{a - b}` with a difference.
pub(super) fn fill_profile(text: &str, r: &Value) -> String {
    let comp = |name: &str| -> Option<f64> {
        r["components"]["components"]
            .as_array()?
            .iter()
            .find(|c| c["part"] == name)?["over_baseline_ns"]["median"]
            .as_f64()
    };
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let Some(j) = rest[i..].find('}') else {
            break;
        };
        let key = &rest[i + 1..i + j];
        let v = match key.split_once(" - ") {
            Some((a, b)) => comp(a).zip(comp(b)).map(|(a, b)| a - b),
            None if key == "established" => {
                f(&case(r, "established_tcp")["over_baseline_ns"]["median"])
            }
            None if key == "stateless_established" => {
                f(&case(r, "stateless_established_tcp")["over_baseline_ns"]["median"])
            }
            None if key == "stateless_new" => {
                f(&case(r, "stateless_new_tcp_flow")["over_baseline_ns"]["median"])
            }
            None if key == "stateless_fresh" => {
                f(&case(r, "stateless_new_tcp_flow_cold")["over_baseline_ns"]["median"])
            }
            None if key == "ceiling_percent" => {
                f(&fwd(r, "xdp_redirect_ceiling")["ratio_to_floor"]).map(|v| (v * 100.0).round())
            }
            None if key == "new_flow" => {
                f(&case(r, "new_tcp_flow")["over_baseline_ns"]["median"]).map(f64::round)
            }
            None if key == "ceiling_budget_ns" => {
                f(&fwd(r, "xdp_redirect_ceiling")["ns_per_packet"]).map(|c| (c / 0.85 - c).round())
            }
            None if key.ends_with("_ceiling_percent") || key.ends_with("_ceiling_gap") => {
                let row = if key.starts_with("table_") {
                    "bgswitch_10000_flows"
                } else {
                    "bgswitch_stateless_10000_flows"
                };
                let c = &fwd(r, "xdp_redirect_ceiling");
                if key.ends_with("_percent") {
                    // Rates, as ratio_to_floor compares them.
                    f(&fwd(r, row)["mpps"]["median"])
                        .zip(f(&c["mpps"]["median"]))
                        .map(|(m, c)| (m / c * 100.0).round())
                } else {
                    // The row's ns per packet against what 85 % of the
                    // ceiling's rate allows.
                    f(&fwd(r, row)["ns_per_packet"])
                        .zip(f(&c["ns_per_packet"]))
                        .map(|(ns, c)| (ns - c / 0.85).round())
                }
            }
            None if key.ends_with("_two_cpus") => {
                let (two, one) = match key {
                    "floor_two_cpus" => (
                        "generator_to_drop_floor_two_cpus",
                        "generator_to_drop_floor",
                    ),
                    "ceiling_two_cpus" => ("xdp_redirect_ceiling_two_cpus", "xdp_redirect_ceiling"),
                    "table_two_cpus" => ("bgswitch_10000_flows_two_cpus", "bgswitch_10000_flows"),
                    _ => (
                        "bgswitch_stateless_10000_flows_two_cpus",
                        "bgswitch_stateless_10000_flows",
                    ),
                };
                super::targets::rate_ratio(r, two, one).map(|v| (v * 100.0).round() / 100.0)
            }
            None if key == "table_10k_over_1" => {
                f(&fwd(r, "bgswitch_10000_flows")["ns_per_packet"])
                    .zip(f(&fwd(r, "bgswitch_1_flows")["ns_per_packet"]))
                    .map(|(a, b)| (a - b).round())
            }
            None if key == "floor_budget_ns" => {
                f(&fwd(r, "generator_to_drop_floor")["ns_per_packet"])
                    .zip(f(&fwd(r, "xdp_redirect_ceiling")["ns_per_packet"]))
                    .map(|(fl, c)| (fl / 0.6 - c).round())
            }
            None if key.ends_with("_over_ceiling") || key == "ceiling_over_floor_ns" => {
                let row = match key {
                    "ceiling_over_floor_ns" => "xdp_redirect_ceiling",
                    "table_1_over_ceiling" => "bgswitch_1_flows",
                    "table_10k_over_ceiling" => "bgswitch_10000_flows",
                    _ => "bgswitch_stateless_10000_flows",
                };
                let base = if key == "ceiling_over_floor_ns" {
                    "generator_to_drop_floor"
                } else {
                    "xdp_redirect_ceiling"
                };
                f(&fwd(r, row)["ns_per_packet"])
                    .zip(f(&fwd(r, base)["ns_per_packet"]))
                    .map(|(a, b)| (a - b).round())
            }
            None if [
                "bgswitch_version_ms",
                "true_ms",
                "journal_append_ms",
                "snapshot_write_ms",
            ]
            .contains(&key) =>
            {
                two_decimals(&r["flip"]["process_spawn_ms"][key])
            }
            None if key == "most_services_flip_ms" => {
                two_decimals(&r["daemon"]["flips_with_most_services"]["command_ms"]["median"])
            }
            None if key.starts_with("under_work_") => {
                let u = &r["daemon"]["flips_with_most_services"]["under_work"];
                two_decimals(match key {
                    "under_work_flip_max_ms" => &u["flip_ms_alone"]["max"],
                    "under_work_history_flip_max_ms" => &u["flip_ms_during_history"]["max"],
                    _ => &u["history_ms"]["median"],
                })
            }
            None if key.ends_with("flip_ms") && key != "most_services_flip_ms" => {
                let s = &r["flip"]["systems"][if key.starts_with("haproxy_") {
                    "haproxy_tcp"
                } else {
                    "bgswitch"
                }];
                let s = if key.contains("idle") {
                    &s["without_load"]
                } else {
                    s
                };
                two_decimals(&s["command_ms"]["median"])
            }
            None => comp(key),
        };
        out.push_str(&v.map_or("?".into(), |v| {
            if v.fract() != 0.0 && v.abs() < 100.0 {
                format!("{v:.1}")
            } else {
                format!("{v:.0}")
            }
        }));
        rest = &rest[i + j + 1..];
    }
    out.push_str(rest);
    out
}
