import RTVirtCore

/// One host socket the guest holds. The descriptor is closed when the last user lets go of
/// this object, so a vCPU parked on it never polls a descriptor number that was reused.
final class HostSocket: Sendable {
    let descriptor: Int32
    let family: SocketFamily
    let type: SocketType
    let backend: any SocketBackend

    init(descriptor: Int32, family: SocketFamily, type: SocketType, backend: any SocketBackend) {
        self.descriptor = descriptor; self.family = family; self.type = type; self.backend = backend
    }

    deinit { backend.close(descriptor) }
}

/// A VM's open sockets by handle. A handle is `generation << 32 | index`: index 1 ... capacity
/// picks the entry, the generation (random, never 0, drawn anew for every socket) must match.
/// A forged, stale or closed handle finds nothing. Handles are never host descriptors.
final class SocketTable: Sendable {
    /// The most sockets one table holds (indices 1 ... 4095).
    static let maximumCapacity = 4095

    private struct Entry {
        var generation: UInt32
        var socket: HostSocket
    }
    private struct State {
        var entries: [Entry?]
        var free: [Int]
        var count = 0
    }
    private let state: LockedValue<State>
    private let generations: @Sendable () -> UInt32
    let capacity: Int

    init(capacity: Int, generations: @escaping @Sendable () -> UInt32 = { UInt32.random(in: 1...UInt32.max) }) {
        self.capacity = capacity
        self.generations = generations
        state = LockedValue(State(entries: Array(repeating: nil, count: capacity + 1), free: Array((1...capacity).reversed())))
    }

    /// Adds `socket`; nil when the table is full (the caller then drops the socket, closing it).
    func insert(_ socket: HostSocket) -> UInt64? {
        let generation = max(generations(), 1)
        return state.withLock { state -> UInt64? in
            guard let index = state.free.popLast() else { return nil }
            state.entries[index] = Entry(generation: generation, socket: socket)
            state.count += 1
            return UInt64(generation) << 32 | UInt64(index)
        }
    }

    /// The socket of `handle`, if it is open.
    func lookup(_ handle: UInt64) -> HostSocket? {
        guard let index = Self.index(handle) else { return nil }
        return state.withLock { state in
            guard state.entries.indices.contains(index), let entry = state.entries[index], entry.generation == UInt32(truncatingIfNeeded: handle >> 32) else { return nil }
            return entry.socket
        }
    }

    /// Removes `handle`; returns its socket (closed when the caller and any parked user drop it).
    func remove(_ handle: UInt64) -> HostSocket? {
        guard let index = Self.index(handle) else { return nil }
        return state.withLock { state in
            guard state.entries.indices.contains(index), let entry = state.entries[index], entry.generation == UInt32(truncatingIfNeeded: handle >> 32) else { return nil }
            state.entries[index] = nil
            state.free.append(index)
            state.count -= 1
            return entry.socket
        }
    }

    /// Removes every socket; returns them.
    func removeAll() -> [HostSocket] {
        state.withLock { state in
            let sockets = state.entries.compactMap { $0?.socket }
            state.entries = Array(repeating: nil, count: capacity + 1)
            state.free = Array((1...capacity).reversed())
            state.count = 0
            return sockets
        }
    }

    /// Open sockets.
    var count: Int { state.withLock { $0.count } }

    private static func index(_ handle: UInt64) -> Int? {
        let index = Int(handle & 0xFFFF_FFFF)
        return index >= 1 && index <= maximumCapacity ? index : nil
    }
}
