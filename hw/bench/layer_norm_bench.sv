// tqt_layer_norm_row with its memories: ROWS rows of the input, gamma and beta, and the outputs and
// steps it writes (words as wide as their $readmemh hex digits: 4 * ceil(bits / 4)). A bench loads
// the memories (cocotb through the simulator, Verilator's tb_layer_norm.sv by $readmemh), then
// pulses `start` once per row with `row` set, and reads the results after `done`.
module layer_norm_bench #(
    parameter int ROWS = 1,
    parameter int D = 64,
    parameter int ADDR_W = 6,
    parameter int IN_W = 16,
    parameter int GAMMA_W = 16,
    parameter int BETA_W = 49,
    parameter int EPS_W = 33,
    parameter int OUT_W = 16,
    parameter int K = 24,
    parameter int F = 16,
    parameter int ROUNDING = 2,
    parameter int S_W = 23,
    parameter int SQ_W = 37,
    parameter int W_W = 43,
    parameter int C_W = 23,
    parameter int NUM_W = 44,
    parameter int N_Q_W = 20,
    parameter int Y_W = 40,
    parameter int SHIFT_W = 8,
    parameter bit RECIPROCAL = 0,
    parameter int G = 24
) (
    input  logic                      clk,
    input  logic                      rst,
    input  logic                      start,
    input  logic                      load,  // read the input memories from <mem_dir>/<name>.hex
    input  logic                      dump,  // write the result memories to <mem_dir>/<name>.out.hex
    input  logic [15:0]               row,
    input  logic [EPS_W-1:0]          eps_q,
    input  logic signed [SHIFT_W-1:0] out_shift,
    output logic                      done
);
  localparam int IN_H = 4 * ((IN_W + 3) / 4), GAMMA_H = 4 * ((GAMMA_W + 3) / 4);
  localparam int BETA_H = 4 * ((BETA_W + 3) / 4), OUT_H = 4 * ((OUT_W + 3) / 4);
  logic [IN_H-1:0] mem_q [ROWS*D];
  logic [GAMMA_H-1:0] mem_gamma [D];
  logic [BETA_H-1:0] mem_beta [D];
  logic [OUT_H-1:0] mem_out [ROWS*D];
  logic signed [63:0] mem_c [ROWS*D], mem_n [ROWS*D], mem_y [ROWS*D];
  logic signed [63:0] mem_s [ROWS], mem_w [ROWS], mem_k [ROWS], mem_root [ROWS], mem_r [ROWS];

  logic [ADDR_W-1:0] rd_addr, out_addr;
  logic signed [IN_W-1:0] rd_q;
  logic signed [GAMMA_W-1:0] rd_gamma;
  logic signed [BETA_W-1:0] rd_beta;
  logic out_valid, unit_done;
  logic signed [OUT_W-1:0] out_q;
  logic signed [S_W-1:0] row_s;
  logic [W_W-1:0] row_w;
  logic signed [7:0] row_k;
  logic [K-1:0] row_root;
  logic [G+1:0] row_r;
  logic signed [C_W-1:0] out_c;
  logic signed [N_Q_W+1:0] out_n;
  logic signed [Y_W-1:0] out_y;
  int base;
  assign base = int'(row) * D;

  always_ff @(posedge clk) begin  // synchronous reads: the data one cycle after the address
    rd_q <= mem_q[base + int'(rd_addr)][IN_W-1:0];
    rd_gamma <= mem_gamma[rd_addr][GAMMA_W-1:0];
    rd_beta <= mem_beta[rd_addr][BETA_W-1:0];
    if (out_valid) begin
      mem_out[base + int'(out_addr)] <= OUT_H'(out_q);
      mem_c[base + int'(out_addr)] <= 64'(out_c);
      mem_n[base + int'(out_addr)] <= 64'(out_n);
      mem_y[base + int'(out_addr)] <= 64'(out_y);
    end
    if (unit_done) begin
      mem_s[row] <= 64'(row_s);
      mem_w[row] <= 64'(row_w);
      mem_k[row] <= 64'(row_k);
      mem_root[row] <= 64'(row_root);
      mem_r[row] <= 64'(row_r);
    end
  end
  assign done = unit_done;

  // the memories' files (+mem_dir=): a whole memory per pulse, no simulator call per word
  string mem_dir;
  initial if (!$value$plusargs("mem_dir=%s", mem_dir)) mem_dir = ".";
  always @(posedge load) begin
    $readmemh({mem_dir, "/mem_q.hex"}, mem_q);
    $readmemh({mem_dir, "/mem_gamma.hex"}, mem_gamma);
    $readmemh({mem_dir, "/mem_beta.hex"}, mem_beta);
  end
  always @(posedge dump) begin
    $writememh({mem_dir, "/mem_out.out.hex"}, mem_out);
    $writememh({mem_dir, "/mem_c.out.hex"}, mem_c);
    $writememh({mem_dir, "/mem_n.out.hex"}, mem_n);
    $writememh({mem_dir, "/mem_y.out.hex"}, mem_y);
    $writememh({mem_dir, "/mem_s.out.hex"}, mem_s);
    $writememh({mem_dir, "/mem_w.out.hex"}, mem_w);
    $writememh({mem_dir, "/mem_k.out.hex"}, mem_k);
    $writememh({mem_dir, "/mem_root.out.hex"}, mem_root);
    $writememh({mem_dir, "/mem_r.out.hex"}, mem_r);
  end

  tqt_layer_norm_row #(.D(D), .ADDR_W(ADDR_W), .IN_W(IN_W), .GAMMA_W(GAMMA_W), .BETA_W(BETA_W),
                       .EPS_W(EPS_W), .OUT_W(OUT_W), .K(K), .F(F), .ROUNDING(ROUNDING), .S_W(S_W),
                       .SQ_W(SQ_W), .W_W(W_W), .C_W(C_W), .NUM_W(NUM_W), .N_Q_W(N_Q_W), .Y_W(Y_W),
                       .SHIFT_W(SHIFT_W), .RECIPROCAL(RECIPROCAL), .G(G))
      unit (.clk(clk), .rst(rst), .start(start), .eps_q(eps_q), .out_shift(out_shift), .rd_addr(rd_addr),
            .rd_q(rd_q), .rd_gamma(rd_gamma), .rd_beta(rd_beta), .out_valid(out_valid), .out_addr(out_addr),
            .out_q(out_q), .done(unit_done), .row_s(row_s), .row_w(row_w), .row_k(row_k),
            .row_root(row_root), .row_r(row_r), .out_c(out_c), .out_n(out_n), .out_y(out_y));
endmodule
