/// x86-64 general-purpose registers, the instruction pointer and flags.
public struct X86Registers: Equatable, Sendable {
    public var rax: UInt64 = 0, rbx: UInt64 = 0, rcx: UInt64 = 0, rdx: UInt64 = 0
    public var rsi: UInt64 = 0, rdi: UInt64 = 0, rsp: UInt64 = 0, rbp: UInt64 = 0
    public var r8: UInt64 = 0, r9: UInt64 = 0, r10: UInt64 = 0, r11: UInt64 = 0
    public var r12: UInt64 = 0, r13: UInt64 = 0, r14: UInt64 = 0, r15: UInt64 = 0
    public var rip: UInt64 = 0
    /// RFLAGS. Bit 1 is always set on hardware.
    public var rflags: UInt64 = 0x2

    /// All registers zero, RFLAGS = 0x2.
    public init() {}
}

/// A segment register's visible selector and hidden descriptor cache.
public struct X86Segment: Equatable, Sendable {
    public var base: UInt64 = 0
    public var limit: UInt32 = 0
    public var selector: UInt16 = 0
    /// The 4-bit descriptor type (for code: 0xB = execute/read, accessed).
    public var type: UInt8 = 0
    public var present: Bool = false
    /// Descriptor privilege level, 0...3.
    public var dpl: UInt8 = 0
    /// Default operation size (D/B).
    public var defaultSize32: Bool = false
    /// S: code/data (true) or system (false) descriptor.
    public var codeOrData: Bool = false
    /// L: 64-bit code segment.
    public var longMode: Bool = false
    /// G: limit in 4 KiB units.
    public var granularity: Bool = false
    public var available: Bool = false
    public var unusable: Bool = false

    /// An all-zero (null, unusable) segment.
    public init() {}

    /// A segment with every field given.
    public init(
        base: UInt64, limit: UInt32, selector: UInt16, type: UInt8, present: Bool, dpl: UInt8,
        defaultSize32: Bool, codeOrData: Bool, longMode: Bool, granularity: Bool,
        available: Bool = false, unusable: Bool = false
    ) {
        self.base = base; self.limit = limit; self.selector = selector; self.type = type
        self.present = present; self.dpl = dpl; self.defaultSize32 = defaultSize32
        self.codeOrData = codeOrData; self.longMode = longMode; self.granularity = granularity
        self.available = available; self.unusable = unusable
    }
}

/// The base and limit of the GDT or IDT.
public struct X86DescriptorTable: Equatable, Sendable {
    public var base: UInt64
    public var limit: UInt16
    /// A table at `base` with `limit` (size - 1).
    public init(base: UInt64 = 0, limit: UInt16 = 0) { self.base = base; self.limit = limit }
}

/// Segment, descriptor-table and control registers, and EFER.
public struct X86SystemRegisters: Equatable, Sendable {
    public var cs = X86Segment(), ds = X86Segment(), es = X86Segment()
    public var fs = X86Segment(), gs = X86Segment(), ss = X86Segment()
    public var tr = X86Segment(), ldt = X86Segment()
    public var gdt = X86DescriptorTable(), idt = X86DescriptorTable()
    public var cr0: UInt64 = 0, cr2: UInt64 = 0, cr3: UInt64 = 0, cr4: UInt64 = 0, cr8: UInt64 = 0
    public var efer: UInt64 = 0
    public var apicBase: UInt64 = 0

    /// All zero.
    public init() {}
}

/// One model-specific register and its value.
public struct X86MSR: Equatable, Sendable {
    /// The MSR index (for example 0x10, `IA32_TSC`).
    public var index: UInt32
    public var value: UInt64
    /// An MSR entry.
    public init(index: UInt32, value: UInt64) { self.index = index; self.value = value }

    /// `IA32_TSC`.
    public static let timeStampCounter: UInt32 = 0x10
    /// `IA32_TSC_DEADLINE`.
    public static let tscDeadline: UInt32 = 0x6e0
}
