import RTVirtCore

/// The privilege a 64-bit guest starts at.
public enum X86StartPrivilege: Sendable {
    /// CPL 0 with the kernel code and data segments. On nested `kvm_pvm` hosts every
    /// instruction at CPL 0 is emulated: keep such code short.
    case kernel
    /// CPL 3 with the user segments and `RFLAGS.IOPL = 3`, so `in`/`out` exit to the VMM
    /// instead of faulting. Code here runs natively even on nested hosts.
    case userWithIOPrivilege
}

/// Where the long-mode system structures live in guest memory.
public struct X86LongModeLayout: Equatable, Sendable {
    /// The GDT (7 eight-byte slots: null, kernel code/data, user code/data, 16-byte TSS).
    public var gdt: GuestAddress
    /// The 64-bit TSS with its I/O permission bitmap (`X86LongMode.taskStateSegmentSize` bytes).
    public var tss: GuestAddress
    /// The IDT (256 sixteen-byte gates), zeroed; the guest fills in its gates.
    public var idt: GuestAddress
    /// The PML4; the PDPT follows one page later, then one page directory per GiB.
    public var pageTables: GuestAddress
    /// Bytes identity-mapped from guest address 0 with 2 MiB pages (a multiple of 1 GiB).
    public var identityMappedBytes: UInt64
    /// RSP0 in the TSS: the stack for interrupts taken at CPL 3.
    public var kernelStackTop: UInt64

    /// A layout with every address given.
    public init(gdt: GuestAddress, tss: GuestAddress, idt: GuestAddress, pageTables: GuestAddress,
                identityMappedBytes: UInt64 = 4 << 30, kernelStackTop: UInt64) {
        self.gdt = gdt; self.tss = tss; self.idt = idt; self.pageTables = pageTables
        self.identityMappedBytes = identityMappedBytes; self.kernelStackTop = kernelStackTop
    }
}

/// Pure functions that prepare a vCPU to start directly in 64-bit mode: identity page tables,
/// GDT, TSS, and the matching register state. No firmware and no real-mode code run.
public enum X86LongMode {
    /// Selectors of the GDT this type writes.
    public enum Selector {
        public static let kernelCode: UInt16 = 0x08
        public static let kernelData: UInt16 = 0x10
        public static let userCode: UInt16 = 0x18 | 3
        public static let userData: UInt16 = 0x20 | 3
        public static let taskState: UInt16 = 0x28
    }

    /// Page-table entry bits.
    public enum PageFlag {
        public static let present: UInt64 = 1 << 0
        public static let writable: UInt64 = 1 << 1
        public static let user: UInt64 = 1 << 2
        public static let largePage: UInt64 = 1 << 7
    }

    /// Control-register and EFER bits used.
    public enum ControlBit {
        public static let cr0ProtectedMode: UInt64 = 1 << 0
        public static let cr0MonitorCoprocessor: UInt64 = 1 << 1
        public static let cr0ExtensionType: UInt64 = 1 << 4
        public static let cr0NumericError: UInt64 = 1 << 5
        public static let cr0WriteProtect: UInt64 = 1 << 16
        public static let cr0Paging: UInt64 = 1 << 31
        public static let cr4PhysicalAddressExtension: UInt64 = 1 << 5
        public static let cr4OSFXSR: UInt64 = 1 << 9
        public static let cr4OSXMMExceptions: UInt64 = 1 << 10
        public static let eferLongModeEnable: UInt64 = 1 << 8
        public static let eferLongModeActive: UInt64 = 1 << 10
    }

    /// The segments of the GDT, in slot order 1...4 (slot 0 is null, 5-6 the TSS).
    public static func segments(tssBase: UInt64) -> (kernelCode: X86Segment, kernelData: X86Segment,
                                                      userCode: X86Segment, userData: X86Segment, tss: X86Segment) {
        func code(_ selector: UInt16, dpl: UInt8) -> X86Segment {
            X86Segment(base: 0, limit: 0xFFFF_FFFF, selector: selector, type: 0xB, present: true, dpl: dpl,
                       defaultSize32: false, codeOrData: true, longMode: true, granularity: true)
        }
        func data(_ selector: UInt16, dpl: UInt8) -> X86Segment {
            X86Segment(base: 0, limit: 0xFFFF_FFFF, selector: selector, type: 0x3, present: true, dpl: dpl,
                       defaultSize32: true, codeOrData: true, longMode: false, granularity: true)
        }
        let tss = X86Segment(base: tssBase, limit: UInt32(taskStateSegmentSize - 1), selector: Selector.taskState, type: 0xB, present: true,
                             dpl: 0, defaultSize32: false, codeOrData: false, longMode: false, granularity: false)
        return (code(Selector.kernelCode, dpl: 0), data(Selector.kernelData, dpl: 0),
                code(Selector.userCode, dpl: 3), data(Selector.userData, dpl: 3), tss)
    }

    /// The 8-byte GDT descriptor for a code or data segment.
    public static func descriptor(for segment: X86Segment) -> UInt64 {
        let limit = UInt64(segment.limit >> (segment.granularity ? 12 : 0))
        let base = segment.base & 0xFFFF_FFFF
        var access = UInt64(segment.type & 0xF) | UInt64(segment.dpl & 3) << 5
        if segment.codeOrData { access |= 1 << 4 }
        if segment.present { access |= 1 << 7 }
        var flags: UInt64 = 0
        if segment.available { flags |= 1 << 0 }
        if segment.longMode { flags |= 1 << 1 }
        if segment.defaultSize32 { flags |= 1 << 2 }
        if segment.granularity { flags |= 1 << 3 }
        return (limit & 0xFFFF) | (base & 0xFF_FFFF) << 16 | access << 40
            | ((limit >> 16) & 0xF) << 48 | flags << 52 | (base >> 24) << 56
    }

    /// The GDT bytes: null, kernel code, kernel data, user code, user data, and the 16-byte
    /// TSS descriptor (whose upper half holds bits 32-63 of the TSS base).
    public static func globalDescriptorTable(tssBase: UInt64) -> [UInt8] {
        let s = segments(tssBase: tssBase)
        let words: [UInt64] = [0, descriptor(for: s.kernelCode), descriptor(for: s.kernelData),
                               descriptor(for: s.userCode), descriptor(for: s.userData),
                               descriptor(for: s.tss), tssBase >> 32]
        return words.flatMap(littleEndianBytes)
    }

    /// Bytes of the TSS: the 104-byte 64-bit TSS, an I/O permission bitmap of 65,536 bits,
    /// and the all-ones byte the architecture requires after it.
    public static let taskStateSegmentSize = 104 + 8192 + 1

    /// The 64-bit TSS with RSP0 = `kernelStackTop` and an I/O permission bitmap that opens
    /// every port to CPL 3.
    ///
    /// `RFLAGS.IOPL = 3` alone is not enough everywhere: `kvm_pvm` runs CPL 3 code with the
    /// hardware IOPL at 0 and drops the guest's IOPL at the first exit, after which KVM's
    /// emulator decides port access from this bitmap, as x86 does when CPL > IOPL.
    public static func taskStateSegment(kernelStackTop: UInt64) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: taskStateSegmentSize)
        bytes.replaceSubrange(4..<12, with: littleEndianBytes(kernelStackTop))
        bytes.replaceSubrange(102..<104, with: littleEndianBytes(UInt16(104))) // bitmap right after the TSS
        bytes[taskStateSegmentSize - 1] = 0xFF
        return bytes
    }

    /// Identity page tables at `base` for `mappedBytes` (a non-zero multiple of 1 GiB, at
    /// most 512 GiB) with 2 MiB pages: PML4, PDPT, then one page directory per GiB. Every
    /// entry is present, writable and, when `userAccessible`, open to CPL 3.
    public static func identityPageTables(base: UInt64, mappedBytes: UInt64, userAccessible: Bool) -> [UInt8] {
        precondition(mappedBytes > 0 && mappedBytes % (1 << 30) == 0 && mappedBytes <= 512 << 30,
                     "identity map must be 1...512 GiB in whole GiB") // host-chosen layout, never guest input
        let gigabytes = Int(mappedBytes >> 30)
        let flags = PageFlag.present | PageFlag.writable | (userAccessible ? PageFlag.user : 0)
        var entries = [UInt64](repeating: 0, count: 512 * (2 + gigabytes))
        entries[0] = (base + 0x1000) | flags
        for gigabyte in 0..<gigabytes {
            entries[512 + gigabyte] = (base + 0x2000 + UInt64(gigabyte) * 0x1000) | flags
            for page in 0..<512 {
                let address = UInt64(gigabyte) << 30 | UInt64(page) << 21
                entries[1024 + gigabyte * 512 + page] = address | flags | PageFlag.largePage
            }
        }
        return entries.flatMap(littleEndianBytes)
    }

    /// Writes the page tables, GDT, TSS and an empty IDT described by `layout` into `memory`.
    public static func writeSystemTables(_ layout: X86LongModeLayout, into memory: any GuestMemory) throws(GuestMemoryError) {
        try memory.write(bytes: identityPageTables(base: layout.pageTables.rawValue,
                                                   mappedBytes: layout.identityMappedBytes, userAccessible: true),
                         at: layout.pageTables)
        try memory.write(bytes: globalDescriptorTable(tssBase: layout.tss.rawValue), at: layout.gdt)
        try memory.write(bytes: taskStateSegment(kernelStackTop: layout.kernelStackTop), at: layout.tss)
        try memory.write(bytes: [UInt8](repeating: 0, count: 256 * 16), at: layout.idt)
    }

    /// Segment and control registers for 64-bit mode at `privilege` with `layout`'s tables.
    public static func systemRegisters(_ layout: X86LongModeLayout, privilege: X86StartPrivilege,
                                       startingFrom current: X86SystemRegisters = X86SystemRegisters()) -> X86SystemRegisters {
        let s = segments(tssBase: layout.tss.rawValue)
        var r = current
        let (code, data) = privilege == .kernel ? (s.kernelCode, s.kernelData) : (s.userCode, s.userData)
        r.cs = code
        r.ds = data; r.es = data; r.fs = data; r.gs = data; r.ss = data
        r.tr = s.tss
        var ldt = X86Segment()
        ldt.type = 0x2
        ldt.unusable = true
        r.ldt = ldt
        r.gdt = X86DescriptorTable(base: layout.gdt.rawValue, limit: 7 * 8 - 1)
        r.idt = X86DescriptorTable(base: layout.idt.rawValue, limit: 256 * 16 - 1)
        r.cr0 = ControlBit.cr0ProtectedMode | ControlBit.cr0MonitorCoprocessor | ControlBit.cr0ExtensionType
            | ControlBit.cr0NumericError | ControlBit.cr0WriteProtect | ControlBit.cr0Paging
        r.cr3 = layout.pageTables.rawValue
        r.cr4 = ControlBit.cr4PhysicalAddressExtension | ControlBit.cr4OSFXSR | ControlBit.cr4OSXMMExceptions
        r.efer = ControlBit.eferLongModeEnable | ControlBit.eferLongModeActive
        return r
    }

    /// General registers to enter at `entry` with stack `stack` and up to six arguments in
    /// the SysV order RDI, RSI, RDX, RCX, R8, R9. At `.userWithIOPrivilege`, RFLAGS.IOPL is 3.
    public static func entryRegisters(entry: GuestAddress, stack: UInt64, privilege: X86StartPrivilege,
                                      arguments: [UInt64] = []) -> X86Registers {
        var r = X86Registers()
        r.rip = entry.rawValue
        r.rsp = stack
        r.rflags = privilege == .kernel ? 0x2 : 0x3002
        let setters: [(inout X86Registers, UInt64) -> Void] = [
            { $0.rdi = $1 }, { $0.rsi = $1 }, { $0.rdx = $1 }, { $0.rcx = $1 }, { $0.r8 = $1 }, { $0.r9 = $1 },
        ]
        for (setter, value) in zip(setters, arguments) { setter(&r, value) }
        return r
    }

    static func littleEndianBytes<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        withUnsafeBytes(of: value.littleEndian, Array.init)
    }
}
