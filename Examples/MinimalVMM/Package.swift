// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "MinimalVMM",
    dependencies: [
        // `name:` because a path dependency is otherwise known by its folder's name (a clone in
        // `RTVirt-main/` would be `RTVirt-main`), and the products below say `package: "RTVirt"`.
        .package(name: "RTVirt", path: "../.."),
    ],
    targets: [
        .executableTarget(
            name: "MinimalVMM",
            dependencies: [
                .product(name: "RTVirtCore", package: "RTVirt"),
                .product(name: "KVMBackend", package: "RTVirt"),
                .product(name: "X86GuestSetup", package: "RTVirt"),
                .product(name: "LongPoll", package: "RTVirt"),
                .product(name: "VMRPC", package: "RTVirt"),
                .product(name: "RealtimeVCPU", package: "RTVirt"),
                .product(name: "CgroupScheduler", package: "RTVirt"),
            ],
            plugins: ["GuestBuilder"]
        ),
        // Builds Guest/ into the flat image that the VMM embeds (run by the plugin at build time).
        .executableTarget(name: "GuestEmbedder"),
        .plugin(name: "GuestBuilder", capability: .buildTool(), dependencies: ["GuestEmbedder"]),
    ],
    swiftLanguageModes: [.v6]
)
