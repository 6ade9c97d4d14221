import PacketRing
import RTVirtCore

/// The bundled bare guest: a flat x86-64 image built from `Guest/` at build time.
///
/// Load it at `GuestLayout.imageAddress` and enter it there in 64-bit mode with
/// RDI = a `BundledGuestMode`, RSI/RDX = the mode's arguments and RSP = the vCPU's stack.
public enum BundledGuest {
    /// The image bytes.
    public static var image: [UInt8] { bundledGuestImageBytes }
}

/// The modes of the bundled guest (`Guest/layout.h`).
public enum BundledGuestMode: UInt64, Sendable, CaseIterable {
    /// Runs RSI iterations of an LCG from seed RDX; reports the low then high 32 bits on the
    /// result port; exits with status 0. `BundledGuestMode.expectedComputeResult` gives the value.
    case compute = 1
    /// Reads 1, 2 and 4 bytes from the input port and echoes each on the result port, then
    /// exits with the last value as status.
    case portIn = 2
    /// MMIO reads and writes of 1, 2, 4 and 8 bytes at `GuestLayout.mmioTestAddress`.
    case mmio = 3
    /// Loops forever.
    case spin = 4
    /// Executes `hlt` (needs CPL 0).
    case halt = 5
    /// VMRPC `null` and `clock.read`, reporting each status and the clock reading, then serves
    /// reverse calls (`GuestLayout.reverseAdd`, `.reverseStop`) until told to stop.
    case rpcDemo = 6
    /// RSI pairs of (bare exit, `null` call), the TSC cycles of each into the data buffer.
    case rpcBench = 7
    /// RSI periods of RDX TSC cycles waiting with VMRPC `timer.sleepUntil` (16-byte form) at
    /// CPL 3; per period the lateness (TSC at resume − deadline, signed) and the arrival before
    /// the guest-side spin, interleaved in the data buffer.
    case cyclicLongPoll = 8
    /// The same with the LAPIC TSC-deadline timer and `sti; hlt` at CPL 0 (needs the
    /// in-kernel irqchip).
    case cyclicInterrupt = 9
    /// `rep outsb` of "RTV!" to the result port, then `rep insw` of three words from the input
    /// port, each reported with a plain `out`.
    case stringIO = 10
    /// x2APIC on, `sti`, then one interruptible `timer.sleepUntil` of RSI TSC cycles (CPL 0,
    /// needs the in-kernel irqchip). The handler of `GuestLayout.injectedVector` reports
    /// `GuestLayout.injectedMark`; then the call's status and the number of interrupts taken.
    case interruptibleSleep = 20
    /// `cyclicLongPoll` without any compensation: the 8-byte `timer.sleepUntil` (no arrival
    /// reported, so no early release) and no guest-side spin; the bare mechanism. Per period the
    /// lateness (negative: the guest resumed early) and the host's wake-up (the guest TSC in the
    /// call's `VMRPCWakeUp` result − deadline), interleaved: their difference is the return
    /// from the host into the guest.
    case cyclicLongPollRaw = 11
    /// RSI sleeps of RDX TSC cycles each (deadline = TSC before the call + RDX) with VMRPC
    /// `timer.sleepUntil` in its 8-byte form: no early release, no guest-side spin. Per sleep
    /// the TSC at resume minus the deadline (signed) into the data buffer; negative means the
    /// host released the guest before its deadline by the guest's own TSC.
    case sleepCheck = 12
    /// UDP echo through the `net.*` procedures at CPL 3: binds port RSI & 0xFFFF (IPv6 when RSI
    /// bit 16 is set), reports `GuestLayout.netReady`, then long-polls for datagrams and sends
    /// each back to its source; RDX datagrams per batch (≤ 1: `receiveFrom`/`sendTo` in the slot).
    case udpEcho = 13
    /// TCP echo through the `net.*` procedures at CPL 3: listens on port RSI & 0xFFFF (IPv6 when
    /// RSI bit 16 is set), reports `GuestLayout.netReady`, accepts one connection at a time
    /// (reporting `GuestLayout.netAccepted`) and echoes it until the peer closes.
    case tcpEcho = 14
    /// The four paths of `rtvirt rpc-bench` in interleaved rounds of (RDX & 0xFFFF) calls each,
    /// RSI samples per path: a bare exit, a `null` call with the doorbell, a `null` call exitless
    /// with the poller warm, and one with the poller asleep (after waiting for `needs_doorbell`);
    /// `data[4i + path]` = TSC cycles. Then one `timer.sleepUntil` of (RDX >> 32) ms, an idle VM.
    /// Reports the host's features, warm calls that rang, asleep waits that timed out, asleep calls
    /// answered exitless. Exits with `GuestLayout.noExitlessStatus` when the host lacks `exitless`.
    case rpcBenchExitless = 21
    /// RSI calls of `GuestLayout.countProcedure` switching at random (seed RDX) between the exitless
    /// and the doorbell paths, with blocking calls and idle gaps between; every count is checked
    /// (exit `GuestLayout.countMismatchStatus` on one that is not the next, after reporting the
    /// index, the count and the expected count). Reports the calls per path.
    case rpcSwitch = 22
    /// UDP echo through the `net.*` procedures at CPL 3 that never parks: it spins on
    /// `net.receiveFrom` with timeout 0 (one exit per attempt) and sends each datagram back with
    /// `net.sendTo`; port RSI & 0xFFFF (IPv6 when RSI bit 16 is set); reports `GuestLayout.netReady`.
    case udpBusyPoll = 30
    /// The interrupt-driven UDP echo (virtio-net's shape) at CPL 0, needing the in-kernel irqchip:
    /// x2APIC on, an IDT gate for `GuestLayout.ringVector`, reports `GuestLayout.netReady`, then
    /// `sti; hlt`. Each interrupt it puts every new receive-ring record's address into the
    /// transmit ring and rings `GuestLayout.ringDoorbellPort`. Its rings are
    /// `GuestLayout.packetRingLayout(forVCPU:)`.
    case ringEcho = 31

    /// The LCG multiplier and increment the `compute` mode uses.
    public static let lcgMultiplier: UInt64 = 6_364_136_223_846_793_005
    public static let lcgIncrement: UInt64 = 1_442_695_040_888_963_407

    /// The value `compute` reports for `iterations` from `seed`, in O(log iterations) steps
    /// (LCG jump-ahead: compose the affine map x → a·x + c with itself by squaring).
    public static func expectedComputeResult(iterations: UInt64, seed: UInt64) -> UInt64 {
        var (totalMultiplier, totalIncrement): (UInt64, UInt64) = (1, 0)
        var (stepMultiplier, stepIncrement) = (lcgMultiplier, lcgIncrement)
        var remaining = iterations
        while remaining > 0 {
            if remaining & 1 == 1 {
                totalMultiplier = totalMultiplier &* stepMultiplier
                totalIncrement = totalIncrement &* stepMultiplier &+ stepIncrement
            }
            stepIncrement = (stepMultiplier &+ 1) &* stepIncrement
            stepMultiplier = stepMultiplier &* stepMultiplier
            remaining >>= 1
        }
        return totalMultiplier &* seed &+ totalIncrement
    }
}

/// The bundled guest's memory layout and ports (`Guest/layout.h`).
public enum GuestLayout {
    public static let gdtAddress = GuestAddress(0x1000)
    public static let tssAddress = GuestAddress(0xA000)
    public static let idtAddress = GuestAddress(0x2000)
    public static let pageTableAddress = GuestAddress(0x3000)
    public static let kernelStackTop: UInt64 = 0xF000
    public static let imageAddress = GuestAddress(0x10000)
    public static let stackTop: UInt64 = 0x20_0000
    public static let stackSize: UInt64 = 0x1_0000
    public static let rpcSlotsAddress = GuestAddress(0x30_0000)
    public static let dataAddress = GuestAddress(0x40_0000)
    public static let dataSize: UInt64 = 0x10_0000
    public static let maximumVCPUs = 12
    public static let mmioTestAddress = GuestAddress(0xD000_0000)
    public static let mmioDoorbellAddress = GuestAddress(0xD000_1000)
    public static let resultPort: UInt16 = 0x510
    public static let exitPort: UInt16 = 0x511
    public static let inputPort: UInt16 = 0x512
    public static let doorbellPort: UInt16 = 0x518
    public static let bareExitPort: UInt16 = 0x519
    /// The interrupt vector of the cyclic-interrupt mode's timer.
    public static let timerVector: UInt64 = 0xEC
    /// The vector the host injects in the interruptible-sleep mode.
    public static let injectedVector: UInt64 = 0xED
    /// What the interruptible-sleep mode's interrupt handler reports.
    public static let injectedMark: UInt64 = 0x1A7E
    /// Reverse-call procedure of the rpc-demo guest: payload two u32, reply their sum.
    public static let reverseAdd: UInt32 = 1
    /// Reverse-call procedure of the rpc-demo guest: reply, then exit.
    public static let reverseStop: UInt32 = 2
    /// Reported by the echo modes once their socket is ready.
    public static let netReady: UInt64 = 0x4E45_5452
    /// Reported by the TCP echo mode for each accepted connection.
    public static let netAccepted: UInt64 = 0x4E45_5441
    /// Bytes per record of the UDP echo's batches.
    public static let netStride: UInt64 = 2048
    /// The status the guest exits with for an unknown mode.
    public static let badModeStatus: UInt64 = 0xBAD0
    /// The host procedure of the rpc-switch mode: counts its calls per vCPU, returns the count (u64).
    public static let countProcedure: UInt32 = 0x7000
    /// The rpc-switch mode's exit status when a count is not the next one.
    public static let countMismatchStatus: UInt64 = 0x200
    /// The exitless modes' exit status when the host does not offer `exitless`.
    public static let noExitlessStatus: UInt64 = 0x300
    /// The ring echo's transmit doorbell port.
    public static let ringDoorbellPort: UInt16 = 0x51A
    /// The ring echo's interrupt vector.
    public static let ringVector: UInt8 = 0xEE
    /// The ring echo's slots per ring.
    public static let ringEntries: UInt32 = 64
    /// Bytes per receive slot of the ring echo.
    public static let ringSlotSize = 2048

    /// The ring echo's rings, in vCPU `id`'s data buffer.
    public static func packetRingLayout(forVCPU id: Int) -> PacketRingLayout {
        PacketRingLayout(base: dataBuffer(forVCPU: id), entries: ringEntries, slotSize: ringSlotSize)
    }

    /// The initial stack pointer of vCPU `id`.
    public static func stackPointer(forVCPU id: Int) -> UInt64 { stackTop - UInt64(id) * stackSize }
    /// The data buffer of vCPU `id`.
    public static func dataBuffer(forVCPU id: Int) -> GuestAddress { GuestAddress(dataAddress.rawValue + UInt64(id) * dataSize) }
}
